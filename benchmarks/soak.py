"""Soak: many SGD steps through one monet plan against eager, same seeds and weights.

    python benchmarks/soak.py [--model vit_tiny_test] [--batch 64] [--steps 200]
        [--budget 0.7] [--dropout 0.1] [--threads N] [--write benchmarks/results/soak.md]

Two copies of a zoo model with the same initial weights train side by side:
one through ``monet.optimize(model, budget)`` (if the budget cannot be met, at
the smallest byte budget the solver names), one eager. Every step feeds both
the same batch and the same RNG seed (dropout stays on), and records
``|loss_monet - loss_eager|``. Steps 2 and the last are measured
(``monet.measure.measure_peak_memory``: zero_grad, forward, loss, backward) for
both. Printed: the largest loss difference, the final largest parameter
difference, the measured peaks, the number of plans cached (one is expected:
every step has the same input signature) and the profile cache's entries
before planning, after planning and after the last step (it should not grow
once the plan exists).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monet  # imported after the path fix, so that a plain checkout runs
import monet.models
from monet.cli import classification_labels, training_loss
from monet.measure import measure_peak_memory
from monet.profile import ProfileCache, default_cache_path
from monet.solver import format_bytes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_test", help="zoo model name")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--budget", default="0.7",
                        help="fraction of eager's peak, or bytes with a unit (e.g. 3MiB)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="the model's dropout (exercises RNG replay); negative: its default")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--cache", default=None,
                        help="profile cache file (default: a fresh one in a temporary folder)")
    parser.add_argument("--write", default=None, help="also write the summary (markdown) here")
    return parser.parse_args(argv)


def _budget(text: str) -> float | int | str:
    """A fraction ("0.7"), whole bytes ("3000000") or a size with a unit ("3MiB")."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value > 1 else value


def _cache_entries(path: Path) -> int:
    return len(ProfileCache(path).entries) if path.exists() else 0


def _resident(module: torch.nn.Module, inputs: tuple) -> Iterator[torch.Tensor]:
    """Parameters, buffers, inputs and the previous step's gradients, lazily.

    A generator, so that no list outlives the call holding the gradients:
    measure_peak_memory keeps only weak references, and zero_grad must be
    able to free the old gradients inside the measured step.
    """
    yield from module.parameters()
    yield from module.buffers()
    yield from (t for t in inputs if isinstance(t, torch.Tensor))
    for p in module.parameters():
        if p.grad is not None:
            yield p.grad


def _batch(name: str, batch: int, step: int, seed: int) -> tuple[Any, ...]:
    # The global RNG is the model's dropout stream; inputs come from their own seed.
    with torch.random.fork_rng():
        return monet.models.example_inputs(name, batch, seed=seed * 100_003 + step)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {} if args.dropout < 0 else {"dropout": args.dropout}
    torch.manual_seed(args.seed)
    model = monet.models.create(args.model, **overrides).train()
    eager = copy.deepcopy(model)
    inputs = [_batch(args.model, args.batch, step, args.seed) for step in range(args.steps)]
    labels = classification_labels(eager(*inputs[0]), seed=args.seed)

    cache = Path(args.cache) if args.cache else default_cache_path()
    entries_before = _cache_entries(cache)
    started = time.perf_counter()
    budget = _budget(args.budget)
    try:
        optimized = monet.optimize(model, budget, inputs[0], measure=False,
                                   time_limit=args.time_limit, profile_cache=str(cache))
        budget_note = f"{args.budget}"
    except monet.InfeasibleBudgetError as error:
        optimized = monet.optimize(model, int(error.minimum), inputs[0], measure=False,
                                   time_limit=args.time_limit, profile_cache=str(cache))
        budget_note = (f"{args.budget} infeasible ({format_bytes(error.budget)}); "
                       f"the smallest feasible, {error.minimum} bytes")
    plan_seconds = time.perf_counter() - started
    entries_planned = _cache_entries(cache)
    report = optimized.report()

    monet_opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=args.lr)
    differences: list[float] = []
    peaks: dict[tuple[str, int], int] = {}
    seconds: dict[str, list[float]] = {"monet": [], "eager": []}
    measured_steps = {2, args.steps}

    for step in range(1, args.steps + 1):
        x = inputs[step - 1]
        losses = {}
        for label, module, params, optimizer in (
            ("monet", optimized, model, monet_opt),
            ("eager", eager, eager, eager_opt),
        ):
            def train_step(module=module, optimizer=optimizer, label=label, x=x,
                           losses=losses) -> None:
                optimizer.zero_grad(set_to_none=True)
                loss = training_loss(module(*x), labels)
                loss.backward()
                losses[label] = loss.detach()

            torch.manual_seed(args.seed * 7919 + step)  # the same dropout masks for both
            if step in measured_steps:
                resident = _resident(params, x)
                peaks[(label, step)] = measure_peak_memory(train_step, resident).peak_bytes
                del resident
            else:
                t = time.perf_counter()
                train_step()
                seconds[label].append(time.perf_counter() - t)
            optimizer.step()
        differences.append(abs(losses["monet"].item() - losses["eager"].item()))

    entries_after = _cache_entries(cache)
    max_param = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), eager.parameters())
    )
    return {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "dropout": args.dropout,
        "budget": budget_note,
        "budget_bytes": report.budget,
        "predicted_peak": report.predicted_peak,
        "recomputed": report.recomputed,
        "solver": f"{report.solver_backend} {report.solver_status}",
        "plan_seconds": plan_seconds,
        "max_loss_difference": max(differences),
        "worst_step": 1 + differences.index(max(differences)),
        "final_loss_difference": differences[-1],
        "final_loss": losses["eager"].item(),
        "max_parameter_difference": max_param,
        "peaks": peaks,
        "plans": len(optimized.plans),
        "cache_entries": (entries_before, entries_planned, entries_after),
        "ms_per_step": {k: 1000 * statistics.median(v) if v else math.nan
                        for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
    }


def summary(result: dict[str, Any]) -> str:
    peaks = result["peaks"]
    last = result["steps"]
    before, planned, after = result["cache_entries"]
    lines = [
        (
            f"model {result['model']}, batch {result['batch']}, dropout {result['dropout']}, "
            f"{result['steps']} SGD steps, {result['threads']} threads"
        ),
        (
            f"budget                      {result['budget']} -> {format_bytes(result['budget_bytes'])} "
            f"({result['budget_bytes']} bytes)"
        ),
        (
            f"plan                        predicted peak {format_bytes(result['predicted_peak'])} "
            f"({result['predicted_peak']} B), "
            f"{result['recomputed']} ops recomputed, {result['solver']}, "
            f"made in {result['plan_seconds']:.1f} s"
        ),
        (
            f"max |loss difference|       {result['max_loss_difference']:.3g} "
            f"(step {result['worst_step']}); at step {last}: {result['final_loss_difference']:.3g}"
        ),
        f"max |parameter difference|  {result['max_parameter_difference']:.3g} after step {last}",
        (
            f"measured peak, monet        step 2: {format_bytes(peaks[('monet', 2)])} "
            f"({peaks[('monet', 2)]} B); step {last}: {format_bytes(peaks[('monet', last)])} "
            f"({peaks[('monet', last)]} B)"
        ),
        (
            f"measured peak, eager        step 2: {format_bytes(peaks[('eager', 2)])} "
            f"({peaks[('eager', 2)]} B); step {last}: {format_bytes(peaks[('eager', last)])} "
            f"({peaks[('eager', last)]} B)"
        ),
        f"plans cached                {result['plans']}",
        (
            f"profile cache entries       {before} before planning, {planned} after planning, "
            f"{after} after step {last}"
        ),
        (
            f"step time (median)          monet {result['ms_per_step']['monet']:.1f} ms, "
            f"eager {result['ms_per_step']['eager']:.1f} ms"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        if args.cache is None:
            args.cache = os.path.join(folder, "profile.json")
        result = run(args)
    text = summary(result)
    print(text)
    if args.write:
        command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(
            "# Soak: 200 SGD steps through one plan\n\n"
            f"`{command.strip()}` on {platform.machine()} {platform.system()}, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}.\n\n"
            "Measured peaks are `monet.measure.measure_peak_memory` (torch profiler "
            "allocator events) over zero_grad, forward, loss and backward.\n\n"
            f"```\n{text}\n```\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
