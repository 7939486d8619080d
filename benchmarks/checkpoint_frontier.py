"""Checkpointing frontier: predicted vs measured peak, step time and gradients against budget.

    python benchmarks/checkpoint_frontier.py [--models vit_small_demo resnet18:16:112]
        [--budgets 1.0,0.7,0.5,min] [--time-limit 20] [--timing-repeats 5] [--threads N]
    monet frontier [same arguments]

For each model and budget, ``monet.optimize(..., measure=True)`` plans the
step and measures it: the peak of the whole step (parameters, gradients,
inputs, activations, workspace) on the device, and eager's and monet's step
times as medians of interleaved runs. ``min`` is the least peak the solver
finds (``monet.solver.minimum_budget`` on the plan's problem), run as a
byte budget from that saved schedule. Each row also runs one training step of
the optimised module and of a copy of the eager model, same seed, dropout
active, and compares every parameter gradient (and buffer) with
``torch.allclose(rtol=1e-5, atol=1e-6)``.

Writes benchmarks/results/checkpoint_frontier.csv and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monet  # imported after the path fix, so that a plain checkout runs
import monet.models
from monet.cli import classification_labels, markdown_table, training_loss
from monet.solver import Problem, format_bytes, keep_all, minimum_budget

MIB = 2**20
DEFAULT_MODELS = ["vit_small_demo", "resnet18:16:112"]
DEFAULT_BUDGETS = "1.0,0.7,0.5,min"
RESULTS = Path(__file__).resolve().parent / "results"
RTOL, ATOL = 1e-5, 1e-6
GRADIENT_SEED = 1234


@dataclass(frozen=True)
class Case:
    """A zoo model at a batch size, optionally fed square images of another size."""

    name: str
    batch: int | None = None
    image: int | None = None

    @classmethod
    def parse(cls, text: str) -> Case:
        """``NAME``, ``NAME:BATCH`` or ``NAME:BATCH:IMAGE``."""
        name, *rest = text.split(":")
        if len(rest) > 2 or not all(part.isdigit() and int(part) > 0 for part in rest):
            raise argparse.ArgumentTypeError(f"expected NAME[:BATCH[:IMAGE]], not {text!r}")
        numbers = [int(part) for part in rest] + [None, None]
        return cls(name, numbers[0], numbers[1])

    def build(self) -> tuple[torch.nn.Module, tuple, int]:
        """The model (seed 0), its inputs (seed 0) and their batch size."""
        spec = monet.models.spec(self.name)
        batch = spec.default_batch if self.batch is None else self.batch
        torch.manual_seed(0)
        if self.image is None:
            model = monet.models.create(self.name).train()
            inputs = monet.models.example_inputs(self.name, batch, seed=0)
        elif "sam2" in spec.tags:
            # SAM 2 is built for its image size; the clicks scale with the image.
            model = monet.models.create(self.name, image_size=self.image).train()
            image, points, labels = monet.models.example_inputs(self.name, batch, seed=0)
            torch.manual_seed(0)
            scale = self.image / image.shape[-1]
            inputs = (torch.randn(batch, 3, self.image, self.image), points * scale, labels)
        else:
            # The zoo feeds the paper's image size; convnets take any size.
            model = monet.models.create(self.name).train()
            torch.manual_seed(0)
            inputs = (torch.randn(batch, 3, self.image, self.image),)
        return model, inputs, batch


def budget_item(text: str) -> str:
    """``min`` or a fraction in (0, 1]."""
    if text == "min":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a budget is a fraction in (0, 1] or 'min', not {text!r}")
    return text


def one_step(module: torch.nn.Module, parameters: list[torch.Tensor], inputs: tuple) -> None:
    """Forward and backward of one training step from cleared gradients, on a fixed seed."""
    for p in parameters:
        p.grad = None
    torch.manual_seed(GRADIENT_SEED)
    output = module(*inputs)
    training_loss(output, classification_labels(output)).backward()


def compare_with_eager(
    pristine: torch.nn.Module, model: torch.nn.Module, optimized: torch.nn.Module, inputs: tuple
) -> tuple[bool, float, bool]:
    """(gradients equal, largest gradient difference, buffers equal) after one step of each."""
    eager = copy.deepcopy(pristine)
    one_step(eager, list(eager.parameters()), inputs)
    one_step(optimized, list(model.parameters()), inputs)
    equal, largest = True, 0.0
    for a, b in zip(eager.parameters(), model.parameters()):
        if a.grad is None or b.grad is None:
            equal &= a.grad is None and b.grad is None
            continue
        largest = max(largest, (a.grad - b.grad).abs().max().item())
        equal &= torch.allclose(a.grad, b.grad, rtol=RTOL, atol=ATOL)
    buffers = all(
        torch.allclose(a.float(), b.float(), rtol=RTOL, atol=ATOL)
        for a, b in zip(eager.buffers(), model.buffers())
    )
    return bool(equal), largest, buffers


def plan_problem(pristine: torch.nn.Module, inputs: tuple) -> Problem:
    """The scheduling problem of a step, without solving or measuring."""
    planned = monet.optimize(copy.deepcopy(pristine), 1.0, inputs, measure=False)
    assert planned.last_plan is not None
    return planned.last_plan.problem


def run_row(
    case: Case,
    item: str,
    pristine: torch.nn.Module,
    inputs: tuple,
    batch: int,
    arguments: argparse.Namespace,
    state: dict[str, Any],
) -> dict[str, Any]:
    """Optimise, measure and check one (model, budget) pair; its CSV row.

    ``state`` carries what later rows of the same model reuse: the problem and
    the reference peak that fractions are of.
    """
    row: dict[str, Any] = {
        "model": case.name,
        "batch": batch,
        "inputs": ", ".join("x".join(map(str, x.shape)) for x in inputs),
        "budget": item,
    }
    model = copy.deepcopy(pristine)
    settings = {
        "measure": True,
        "timing_repeats": arguments.timing_repeats,
        "time_limit": arguments.time_limit,
    }
    try:
        if item == "min":
            if "problem" not in state:
                state["problem"] = plan_problem(pristine, inputs)
            least, bound = minimum_budget(state["problem"], arguments.time_limit)
            row["min_lower_bound_bytes"] = bound
            with tempfile.TemporaryDirectory() as folder:
                # Run exactly the least-peak schedule: solving again might find a worse one.
                path = Path(folder) / "least.json"
                least.save(path)
                optimized = monet.optimize(
                    model, least.predicted_peak, inputs, schedule=path, **settings
                )
        else:
            optimized = monet.optimize(model, float(item), inputs, **settings)
    except monet.InfeasibleBudgetError as error:
        row.update(budget_bytes=error.budget, status="infeasible", minimum_bytes=error.minimum)
        if "reference" in state:
            row["budget_fraction"] = error.budget / state["reference"]
        return row

    plan = optimized.last_plan
    assert plan is not None
    report = optimized.report()
    state.setdefault("problem", plan.problem)
    state["method"] = report.measurement_method
    # What fractions are of: the larger of eager's measured peak and keep-everything's.
    reference = max(report.eager_peak or 0, keep_all(plan.problem).predicted_peak)
    state["reference"] = reference
    grads_equal, largest, buffers_equal = compare_with_eager(pristine, model, optimized, inputs)
    row.update(
        budget_fraction=report.budget / reference,
        budget_bytes=report.budget,
        eager_peak_bytes=report.eager_peak,
        predicted_peak_bytes=report.predicted_peak,
        measured_peak_bytes=report.measured_peak,
        measured_over_predicted=(report.measured_peak or 0) / report.predicted_peak,
        eager_step_s=report.eager_step_seconds,
        monet_step_s=report.step_seconds,
        overhead_pct=None if report.overhead is None else 100 * report.overhead,
        predicted_recompute_ms=1000 * report.predicted_overhead_seconds,
        solve_s=report.solve_seconds,
        status=f"{report.solver_status} ({report.solver_backend})",
        recomputed_ops=report.recomputed,
        grads_equal=grads_equal,
        max_grad_diff=largest,
        buffers_equal=buffers_equal,
    )
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table for people: sizes in MiB, times rounded."""

    def number(value: Any, digits: int, scale: float = 1.0) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value / scale:.{digits}f}"

    table = []
    for r in rows:
        if r["status"] == "infeasible":
            minimum = r.get("minimum_bytes")
            status = f"infeasible (min {'?' if minimum is None else format_bytes(minimum)})"
            checks = "-"
        else:
            status = r["status"]
            checks = "yes" if r["grads_equal"] else f"NO (max diff {r['max_grad_diff']:.1e})"
            if not r["buffers_equal"]:
                checks += ", buffers differ"
        table.append([
            r["model"], r["budget"], number(r.get("budget_fraction"), 3),
            number(r.get("budget_bytes"), 2, MIB), number(r.get("predicted_peak_bytes"), 2, MIB),
            number(r.get("measured_peak_bytes"), 2, MIB),
            number(r.get("measured_over_predicted"), 3),
            number(r.get("eager_step_s"), 3), number(r.get("monet_step_s"), 3),
            number(r.get("overhead_pct"), 1), number(r.get("solve_s"), 2), status, checks,
        ])
    header = [
        "model", "budget", "fraction", "budget MiB", "predicted MiB", "measured MiB",
        "measured/predicted", "eager step s", "monet step s", "overhead %", "solve s", "status",
        "grads = eager",
    ]
    return markdown_table(header, table)


def machine() -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the frontier, print its table and write it; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="checkpoint_frontier",
        description=__doc__.splitlines()[0],
        epilog="Models are NAME[:BATCH[:IMAGE]]: resnet18:16:112 feeds resnet18 16 images of 112².",
    )
    parser.add_argument("--models", nargs="+", type=Case.parse,
                        default=[Case.parse(m) for m in DEFAULT_MODELS],
                        help=f"zoo models (default {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help=f"comma-separated fractions and 'min' (default {DEFAULT_BUDGETS})")
    parser.add_argument("--time-limit", type=float, default=20.0,
                        help="solver seconds per budget, and for 'min' (default 20)")
    parser.add_argument("--timing-repeats", type=int, default=5,
                        help="interleaved timed steps per method (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS,
                        help="where the .csv and .md go (default benchmarks/results)")
    arguments = parser.parse_args(argv)
    try:
        budgets = [budget_item(b.strip()) for b in arguments.budgets.split(",") if b.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    method = "torch.profiler [memory] events (CPU allocator)"
    total = len(arguments.models) * len(budgets)
    for case in arguments.models:
        pristine, inputs, batch = case.build()
        state: dict[str, Any] = {}
        for item in budgets:
            print(f"[{len(rows) + 1}/{total}] {case.name} batch {batch}, budget {item} ...",
                  file=sys.stderr, flush=True)
            t = time.perf_counter()
            row = run_row(case, item, pristine, inputs, batch, arguments, state)
            row["wall_s"] = time.perf_counter() - t
            rows.append(row)
            print(f"    {row['status']} in {row['wall_s']:.1f} s", file=sys.stderr, flush=True)
        method = state.get("method", method)

    table = markdown(rows)
    print(table)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/checkpoint_frontier.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    notes = [
        f"date: {now}, {time.perf_counter() - started:.0f} s in all",
        f"machine: {machine()}",
        f"command: `{command.strip()}`",
        (
            f"peak memory: {method}; the whole step (parameters, gradients, inputs, "
            "activations, workspace), one step after a warm-up"
        ),
        (
            f"step time: medians of {arguments.timing_repeats} interleaved eager/monet steps "
            "(time.perf_counter); on a shared machine only the ratio means much"
        ),
        (
            f"solver: CP-SAT, {arguments.time_limit:g} s per budget; fraction = budget over "
            "the larger of eager's measured peak and the keep-everything plan's; `min` = least "
            "peak found by monet.solver.minimum_budget, run from its saved schedule"
        ),
        (
            "grads = eager: one step of the optimised module and of a copy of the eager model "
            f"(same seed, dropout active), every parameter gradient torch.allclose(rtol={RTOL}, "
            f"atol={ATOL}); buffers too"
        ),
    ]
    header = "# Checkpointing frontier\n\n" + "".join(f"- {note}\n" for note in notes)
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = arguments.output_dir / "checkpoint_frontier.csv"
    md_path = arguments.output_dir / "checkpoint_frontier.md"
    # Nullable integers: byte columns with gaps stay integers, not floats.
    pd.DataFrame(rows).convert_dtypes().to_csv(csv_path, index=False)
    md_path.write_text(header + "\n" + table + "\n")
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
