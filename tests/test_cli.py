"""The ``monet`` command: profile → solve → run a saved schedule, errors, frontier, demo."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monet
import monet.models
from monet.cli import budget_arg, main
from monet.solver import Problem, ProblemFileError, Schedule, keep_all


@pytest.fixture(autouse=True)
def _one_thread():
    # Two OpenMP threads on a shared 2-core machine spin against each other: a
    # tiny step takes 100x longer. One thread keeps these tests fast and steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stdout captured (for module-scoped fixtures, where capsys is not)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory) -> dict[str, object]:
    """``monet profile vit_tiny_test`` then ``monet solve --budget 0.9``, once for the module."""
    folder = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        # Module fixtures run before conftest's per-test cache fixture: same private cache.
        patch.setenv("MONET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "monet-cache"))
        torch.set_num_threads(1)
        problem, schedule = folder / "p.json", folder / "s.json"
        profile_code, profile_out = run(["profile", "vit_tiny_test", "-o", str(problem)])
        solve_code, solve_out = run(
            ["solve", str(problem), "--budget", "0.9", "--time-limit", "5", "-o", str(schedule)]
        )
        torch.set_num_threads(threads)
    return {
        "problem": problem, "schedule": schedule, "profile": (profile_code, profile_out),
        "solve": (solve_code, solve_out),
    }


def test_profile_writes_the_problem_and_prints_counts(vit_files):
    code, out = vit_files["profile"]
    assert code == 0
    problem = Problem.load(vit_files["problem"])
    assert f"{len(problem.nodes)} nodes" in out
    assert f"storages     {len(problem.storage_bytes)} " in out
    assert problem.budget is None  # no --budget: the problem carries none
    assert problem.meta["model"] == "vit_tiny_test" and problem.meta["batch"] == 2


def test_solved_schedule_runs_through_optimize(vit_files):
    code, out = vit_files["solve"]
    assert code == 0
    assert "status" in out and "predicted peak" in out and "wrote" in out
    problem = Problem.load(vit_files["problem"])
    schedule = Schedule.load(vit_files["schedule"], problem)
    assert schedule.budget == int(0.9 * keep_all(problem).predicted_peak)
    assert schedule.predicted_peak <= schedule.budget
    assert schedule.recompute, "a 90% budget should need some recomputation"

    torch.manual_seed(0)
    model = monet.models.create("vit_tiny_test")
    (x,) = monet.models.example_inputs("vit_tiny_test", 2)
    optimized = monet.optimize(
        model, schedule.budget, (x,), schedule=vit_files["schedule"], measure=False
    )
    assert optimized.last_plan.schedule.recompute == schedule.recompute
    loss = torch.nn.functional.cross_entropy(optimized(x), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_schedule_for_another_graph_is_refused(vit_files, tmp_path):
    problem, schedule = tmp_path / "resnet.json", tmp_path / "resnet-schedule.json"
    assert run(["profile", "resnet_tiny_test", "-o", str(problem)])[0] == 0
    assert run(["solve", str(problem), "--budget", "0.9", "--time-limit", "3",
                "-o", str(schedule)])[0] == 0
    model = monet.models.create("vit_tiny_test")
    (x,) = monet.models.example_inputs("vit_tiny_test", 2)
    with pytest.raises(ProblemFileError, match="graph_hash"):
        monet.optimize(model, 1 << 30, (x,), schedule=schedule, measure=False)


def test_a_truncated_problem_is_one_clear_error(vit_files, tmp_path, capsys):
    text = vit_files["problem"].read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    assert main(["solve", str(truncated), "--budget", "0.9"]) == 2
    error = capsys.readouterr().err.strip()
    assert "truncated.json" in error and "not valid JSON" in error
    assert len(error.splitlines()) == 1

    # Valid JSON with nodes cut off: the hash no longer matches, and the file is named.
    data = json.loads(text)
    data["nodes"] = data["nodes"][: len(data["nodes"]) // 2]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    assert main(["solve", str(edited), "--budget", "0.9"]) == 2
    error = capsys.readouterr().err
    assert "edited.json" in error and any(f in error for f in ("graph_hash", "invalid", "choices"))

    assert main(["solve", str(tmp_path / "missing.json"), "--budget", "0.9"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_solve_needs_a_budget_when_the_problem_has_none(vit_files, capsys):
    assert main(["solve", str(vit_files["problem"])]) == 2
    assert "--budget" in capsys.readouterr().err


def test_frontier_prints_a_row_per_budget(vit_files, capsys):
    code = main(["solve", str(vit_files["problem"]), "--frontier", "1.0,0.9,0.1",
                 "--time-limit", "3"])
    assert code == 0
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
    ]
    assert len(rows) == 4  # header + one per budget
    assert [row[0] for row in rows] == ["budget", "1.0", "0.9", "0.1"]
    status = rows[0].index("status")
    assert rows[1][status] == "optimal" and rows[2][status] in ("optimal", "feasible")
    assert rows[3][status].startswith("infeasible (minimum")


def test_budget_arguments():
    assert budget_arg("0.5") == 0.5
    assert budget_arg("1") == 1.0  # all of the peak, not one byte
    assert budget_arg("4000000") == 4_000_000
    assert budget_arg("300MiB") == "300MiB"
    for bad in ("2.5", "0", "3XB", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            budget_arg(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["solve", "p.json", "--budget", "2.5"])
    assert exit_info.value.code == 2


def test_demo_trains_within_the_budget(capsys):
    code = main(["demo", "--model", "vit_tiny_test", "--batch", "2", "--budget", "1.0",
                 "--time-limit", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "vit_tiny_test" in out and "monet plan" in out and "measured peak" in out
    assert "step 3" in out


def test_demo_reports_an_impossible_budget(capsys):
    code = main(["demo", "--model", "vit_tiny_test", "--batch", "2", "--budget", "0.2",
                 "--time-limit", "2", "--timing-repeats", "0"])
    assert code == 2
    assert "cannot be met" in capsys.readouterr().err


def test_frontier_passes_its_arguments_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frontier", "--help"])
    assert exit_info.value.code == 0
    assert "--timing-repeats" in capsys.readouterr().out  # checkpoint_frontier.py's option


def test_bench_refuses_compile_models_it_does_not_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "vit_tiny_test", "--methods", "eager", "--compile-models", "nothing"])
    assert exit_info.value.code == 2
    assert "--compile-models nothing: not among the models" in capsys.readouterr().err


def test_console_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "monet.cli", "--help"], capture_output=True, text=True,
        timeout=60, check=False, cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    for command in ("demo", "profile", "solve", "bench", "report", "frontier"):
        assert command in result.stdout
