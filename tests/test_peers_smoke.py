"""Smoke test of benchmarks/peers.py through ``monet bench``: a tiny model, three methods,
every output written; its options (models, methods, torch.compile's models) without running."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", PEERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_monet_bench_writes_a_frontier_for_each_method(tmp_path, capsys):
    from monet.cli import main

    code = main([
        "bench", "vit_tiny_test", "--methods", "eager", "checkpoint", "monet",
        "--repeats", "1", "--time-limit", "2", "--output-dir", str(tmp_path),
    ])
    assert code == 0
    rows = pd.read_csv(tmp_path / "frontier.csv")
    assert set(rows["method"]) == {"eager", "checkpoint", "monet"}
    assert set(rows.loc[rows["method"] == "checkpoint", "setting"]) == {
        "every block", "every 2nd block",
    }
    # One row per budget, feasible or not, and one at the least peak found.
    assert (rows["method"] == "monet").sum() == 5
    assert "least peak" in set(rows["setting"])
    eager = rows[rows["method"] == "eager"].iloc[0]
    assert eager["peak_over_eager"] == 1.0 and eager["overhead"] == 1.0
    measured = rows[rows["peak_bytes"].notna()]
    assert measured["grads_equal"].all()
    assert measured["memory_method"].str.contains("profiler").all()
    for name in ("frontier_vit_tiny_test.png", "timeline_vit_tiny_test.png",
                 "summary.md", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "monet" in capsys.readouterr().out  # the summary table is printed
    assert "command: `monet bench vit_tiny_test --methods" in (tmp_path / "report.md").read_text()


def test_models_are_positional_or_after_models(peers):
    labels = [peers.case_label(c) for c in peers.parse_arguments(
        ["vit_tiny_test", "convnext_t:6:224", "--models", "revvit_s:8:224"]).models]
    assert labels == ["vit_tiny_test", "convnext_t:6:224", "revvit_s:8:224"]
    assert [peers.case_label(c) for c in peers.parse_arguments(["--models", "vit_tiny_test"])
            .models] == ["vit_tiny_test"]
    assert [peers.case_label(c) for c in peers.parse_arguments([]).models] == peers.DEFAULT_MODELS


def test_torch_compile_runs_on_every_model_unless_restricted(peers):
    everything = peers.parse_arguments(["vit_tiny_test", "convnext_tiny_test"])
    restricted = peers.parse_arguments(
        ["vit_tiny_test", "convnext_tiny_test:2", "--compile-models", "vit_tiny_test"])
    for arguments in (everything, restricted):
        arguments.compile_skipped = set()
    vit = peers.Subject("vit_tiny_test", None, (), 2)
    convnext = peers.Subject("convnext_tiny_test:2", None, (), 2)
    assert peers.COMPILE in peers.methods_of(convnext, everything)
    assert peers.COMPILE in peers.methods_of(vit, restricted)
    assert peers.COMPILE not in peers.methods_of(convnext, restricted)
    assert restricted.compile_skipped == {"convnext_tiny_test:2"}  # it gets a row that says so
    with pytest.raises(SystemExit):
        peers.parse_arguments(["vit_tiny_test", "--compile-models", "convnext_t"])


def test_block_containers_find_the_repeated_blocks(peers):
    import monet.models

    model = monet.models.create("vit_tiny_test")
    (blocks,) = peers.block_containers(model)
    assert blocks is model.blocks
    wrapped, count, total = peers.checkpointed(model, every=2)
    assert (count, total) == (1, 2)
    assert isinstance(wrapped.blocks[0], peers.Checkpointed)
    assert not isinstance(wrapped.blocks[1], peers.Checkpointed)
    assert not isinstance(model.blocks[0], peers.Checkpointed)  # the original is untouched


@pytest.mark.parametrize("command", ["bench", "report"])
def test_monet_bench_and_report_run_the_peers_benchmark(command, capsys):
    from monet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: monet {command}" in out and "--compile-models" in out
    folder = "monet-bench" if command == "bench" else "benchmarks/results/peers"
    assert f"(default {folder})" in " ".join(out.split())
