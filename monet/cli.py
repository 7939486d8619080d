"""The ``monet`` command: ``demo``, ``profile``, ``solve``, ``bench``, ``report`` and ``frontier``.

    monet demo                                   # optimise the embedded ViT, train 3 steps
    monet profile vit_small_demo -o problem.json # capture + profile a zoo model
    monet solve problem.json --budget 0.5 -o schedule.json
    monet solve problem.json --budget 0.5 --frontier 1.0,0.7,0.5
    monet bench convnext_t:6:224 --budgets 1.0,0.7,0.5,0.35 --methods eager checkpoint monet
                                                 # monet beside its peers, into ./monet-bench
    monet report                                 # the same on the report's models, into
                                                 # benchmarks/results/peers (the committed one)
    monet frontier --models vit_tiny_test        # benchmarks/checkpoint_frontier.py

``bench`` and ``report`` run ``benchmarks/peers.py`` (models are positional,
options pass through: ``monet bench --help``); ``frontier`` runs
``benchmarks/checkpoint_frontier.py``, monet's predicted against measured peak
per budget. All three need monet's source tree.

A budget is a fraction of the unoptimised peak (``0.5``), a number of bytes
(``400000000``) or a size with a unit (``300MiB``, ``4GB``). Errors a user can
fix (an impossible budget, a bad problem or schedule file) print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

DEMO_MODEL = "vit_small_demo"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PEERS = BENCHMARKS / "peers.py"
FRONTIER = BENCHMARKS / "checkpoint_frontier.py"
BENCH_OUTPUT = Path("monet-bench")
"""Where ``monet bench`` writes unless told (``monet report`` writes the committed report)."""


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 2."""


# ------------------------------------------------------------------ budgets


def budget_arg(text: str) -> int | float | str:
    """argparse type of a budget: ``0.5`` (fraction), ``400000000`` (bytes) or ``300MiB``.

    A plain number in (0, 1] is a fraction, a plain integer above 1 is bytes,
    anything else must carry a unit; ``monet.parse_budget`` has the last word.
    """
    from monet.api import parse_budget

    value: int | float | str = text.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        # "1" means all of the peak, not one byte; "2.5" is neither and is refused below.
        value = number if 0 < number <= 1 or not text.strip().isdigit() else int(text)
    try:
        parse_budget(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def budget_list_arg(text: str) -> list[int | float | str]:
    """argparse type of ``--frontier``: comma-separated budgets."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of budgets")
    return [budget_arg(item) for item in items]


def resolve_budget(budget: float | str, reference: int) -> int:
    """Bytes of ``budget``; a fraction is of ``reference`` bytes."""
    from monet.api import parse_budget

    kind, value = parse_budget(budget)
    return int(reference * value) if kind == "fraction" else int(value)


def describe_budget(budget: float | str) -> str:
    from monet.api import parse_budget
    from monet.solver import format_bytes

    kind, value = parse_budget(budget)
    if kind == "fraction":
        return f"{100 * value:g}% of the unoptimised peak"
    return format_bytes(value)


# ------------------------------------------------------------------- shared


def training_loss(output: Any, labels: Any = None) -> Any:
    """A loss for any zoo model's output.

    (batch, classes) logits with ``labels`` get cross-entropy; anything else
    the mean of squares of every floating tensor in the output, so that every
    output receives a gradient.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils import _pytree as pytree

    if labels is not None and isinstance(output, torch.Tensor) and output.dim() == 2:
        return F.cross_entropy(output, labels)
    leaves = [
        t for t in pytree.tree_leaves(output)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not leaves:
        raise CommandError("the model's output has no floating tensor to take a loss of")
    return sum(t.float().square().mean() for t in leaves)


def classification_labels(output: Any, seed: int = 0) -> Any:
    """Random class labels for (batch, classes) logits, else None; leaves the global RNG alone."""
    import torch

    if not (isinstance(output, torch.Tensor) and output.dim() == 2):
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(output.shape[1], (output.shape[0],), generator=generator)


def zoo_model(name: str, batch: int | None, seed: int = 0) -> tuple[Any, tuple, int]:
    """The zoo model ``name`` (seeded), its example inputs and the batch they have."""
    import torch

    import monet.models

    try:
        spec = monet.models.spec(name)
    except KeyError as error:
        raise CommandError(error.args[0]) from None
    batch = spec.default_batch if batch is None else batch
    torch.manual_seed(seed)
    model = monet.models.create(name)
    model.train()
    return model, monet.models.example_inputs(name, batch, seed=seed), batch


def shapes(inputs: tuple) -> str:
    import torch

    return ", ".join(
        "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
        for x in inputs
    )


def _note(message: str) -> None:
    print(f"monet: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Optimise a zoo model for a budget, print the report, train a few steps through it."""
    import torch

    import monet

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, inputs, batch = zoo_model(args.model, args.batch)
    parameters = sum(p.numel() for p in model.parameters())
    device = str(next(model.parameters()).device)
    print(f"monet {monet.__version__} demo")
    print(
        f"  model             {args.model} ({type(model).__name__}, "
        f"{parameters / 1e6:.2f} M parameters)"
    )
    print(f"  batch             {batch} (inputs {shapes(inputs)})")
    print(
        f"  device            {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    print(f"  budget            {describe_budget(args.budget)}")
    sys.stdout.flush()
    _note(
        f"planning {args.model}: capture, profile, solve (up to {args.time_limit:g} s), "
        "then measure eager and optimised steps ..."
    )
    started = time.perf_counter()
    optimized = monet.optimize(
        model, args.budget, inputs, time_limit=args.time_limit, measure=True,
        timing_repeats=args.timing_repeats, progress=args.verbose,
    )
    _note(f"planned in {time.perf_counter() - started:.1f} s")
    print()
    print(optimized.report())
    print()

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    labels = None
    print(f"training {args.steps} steps through the optimised module (SGD, lr {args.lr:g})")
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = optimized(*inputs)
        if labels is None:
            labels = classification_labels(output)
        loss = training_loss(output, labels)
        loss.backward()
        optimizer.step()
        value = loss.item()
        print(f"  step {step}  loss {value:.4f}  {time.perf_counter() - started:.3f} s")
        if not math.isfinite(value):
            print(f"monet: error: the loss of step {step} is {value}", file=sys.stderr)
            return 1
    return 0


# ------------------------------------------------------------------ profile


def cmd_profile(args: argparse.Namespace) -> int:
    """Capture and profile a zoo model; write its scheduling problem as JSON."""
    import monet
    from monet.api import parse_budget
    from monet.solver import format_bytes, keep_all

    model, inputs, batch = zoo_model(args.model, args.batch)
    kind = parse_budget(args.budget)[0] if args.budget is not None else None
    # A budget that keep-everything always meets makes optimize() skip the solver.
    # Only a fractional budget needs the reference peak (1.0 measures eager once);
    # otherwise a byte budget no plan reaches skips that measurement too.
    planning_budget: int | float = 1.0 if kind == "fraction" else 2**62 - 1
    _note(f"capturing and profiling {args.model} at batch {batch} ...")
    started = time.perf_counter()
    optimized = monet.optimize(
        model, planning_budget, inputs, measure=False, progress=args.verbose,
        lossy_variants=args.lossy_variants, attention_variants=args.attention_variants,
    )
    seconds = time.perf_counter() - started
    plan = optimized.last_plan
    assert plan is not None  # optimize() with example inputs in training mode plans now
    planned = plan.problem
    budget = None
    if args.budget is not None:
        # A fraction means what it means to optimize(): of the larger of eager's
        # measured peak and the keep-everything plan, which is what 1.0 resolved to.
        budget = resolve_budget(args.budget, planned.budget or 0)
    meta = {**planned.meta, "model": args.model, "batch": batch, "inputs": shapes(inputs)}
    problem = dataclasses.replace(planned, budget=budget, meta=meta)
    problem.save(args.output)

    phases = {phase: len(problem.indices(phase)) for phase in ("input", "forward", "backward")}
    keep_all_peak = keep_all(problem).predicted_peak
    print(f"model        {args.model} ({problem.name}), batch {batch}, inputs {shapes(inputs)}")
    print(
        f"graph        {len(problem.nodes)} nodes ({phases['input']} inputs, "
        f"{phases['forward']} forward, {phases['backward']} backward), "
        f"hash {problem.graph_hash}"
    )
    print(
        f"storages     {len(problem.storage_bytes)} "
        f"({format_bytes(sum(problem.storage_bytes))} in all)"
    )
    print(f"keep-all     peak {format_bytes(keep_all_peak)} ({keep_all_peak} bytes)")
    kinds = Counter(a.name for c in problem.choices for a in c.alternatives[1:])
    offered = ", ".join(f"{name} x{count}" for name, count in sorted(kinds.items())) or "none"
    print(f"variants     {len(problem.choices)} ops with alternatives: {offered}")
    stored = "none" if budget is None else f"{format_bytes(budget)} ({budget} bytes)"
    print(f"budget       {stored}")
    print(
        f"profiled     {problem.meta.get('profiled_ops', '?')} ops measured, "
        f"{problem.meta.get('cached_ops', '?')} from cache, {seconds:.1f} s in all"
    )
    print(f"wrote        {args.output}")
    return 0


# -------------------------------------------------------------------- solve


def load_problem(path: Path) -> Any:
    """``Problem.load`` with errors that name the file."""
    from monet.solver import Problem, ProblemFileError

    try:
        return Problem.load(path)
    except FileNotFoundError:
        raise CommandError(f"{path}: no such problem file") from None
    except ProblemFileError as error:
        message = str(error)
        raise CommandError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def cmd_solve(args: argparse.Namespace) -> int:
    """Solve a problem file for one budget (writing the schedule) or for a frontier of budgets."""
    from monet.solver import InfeasibleBudgetError, format_bytes, keep_all, solve

    problem = load_problem(args.problem)
    reference = keep_all(problem).predicted_peak
    print(
        f"problem         {args.problem}: {problem.name or 'unnamed'}, {len(problem.nodes)} nodes, "
        f"{len(problem.storage_bytes)} storages, keep-all peak {format_bytes(reference)}"
    )
    if args.frontier:
        return _frontier(problem, args, reference)

    if args.budget is not None:
        budget = resolve_budget(args.budget, reference)
    elif problem.budget is not None:
        budget = problem.budget
    else:
        raise CommandError(f"{args.problem} carries no budget: pass --budget")
    print(f"budget          {format_bytes(budget)} ({budget} bytes, "
          f"{100 * budget / reference:.1f}% of keep-all)")
    sys.stdout.flush()
    progress: Callable[[str], None] | None = (
        (lambda line: print(line, file=sys.stderr)) if args.verbose else None
    )
    try:
        schedule = solve(problem, budget, args.time_limit, args.backend, progress=progress)
    except InfeasibleBudgetError as error:
        raise CommandError(str(error)) from None
    bound = "unknown" if schedule.bound is None else f"{1000 * schedule.bound:.3f} ms"
    gap = "unknown" if schedule.gap is None else f"{100 * schedule.gap:.2f}%"
    print(f"status          {schedule.status} ({schedule.backend})")
    peak = schedule.predicted_peak
    print(f"predicted peak  {format_bytes(peak)} ({peak} bytes)")
    print(f"added time      {1000 * schedule.predicted_overhead:.3f} ms (predicted: "
          "recomputation and variants)")
    print(f"bound           {bound}, gap {gap} (of the time above the fastest variants kept "
          f"whole: {1000 * schedule.floor:.3f} ms)")
    print(f"solve time      {schedule.solve_seconds:.2f} s")
    print(
        f"schedule        {len(schedule.kept)} storages kept, "
        f"{len(schedule.recompute)} ops recomputed"
    )
    if args.output is not None:
        schedule.save(args.output)
        print(f"wrote           {args.output}")
    return 0


def _frontier(problem: Any, args: argparse.Namespace, reference: int) -> int:
    """One solve per budget; a table of what each costs."""
    from monet.solver import InfeasibleBudgetError, format_bytes, solve

    rows = []
    for item in args.frontier:
        budget = resolve_budget(item, reference)
        _note(f"solving for {format_bytes(budget)} ...")
        started = time.perf_counter()
        try:
            schedule = solve(problem, budget, args.time_limit, args.backend)
        except InfeasibleBudgetError as error:
            minimum = "unknown" if error.minimum is None else format_bytes(error.minimum)
            rows.append([str(item), format_bytes(budget), "-", "-",
                         f"infeasible (minimum {minimum})", f"{time.perf_counter() - started:.2f}"])
            continue
        rows.append([
            str(item), format_bytes(budget), format_bytes(schedule.predicted_peak),
            f"{1000 * schedule.predicted_overhead:.3f}", schedule.status,
            f"{schedule.solve_seconds:.2f}",
        ])
    print()
    print(markdown_table(
        ["budget", "bytes", "predicted peak", "added ms", "status", "solve s"], rows
    ))
    return 0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table with padded columns (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def numeric(i: int) -> bool:
        values = [row[i] for row in cells[1:] if row[i] not in ("", "-")]
        return bool(values) and all(_is_number(v) for v in values)

    right = [numeric(i) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)
    ) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%"))
    except ValueError:
        return False
    return True


# -------------------------------------------------------------------- bench


def load_benchmark(path: Path, command: str) -> ModuleType:
    """A benchmark script of monet's source tree, which ``monet command`` runs."""
    if not path.is_file():
        raise CommandError(
            f"{path} not found: `monet {command}` needs monet's source tree "
            "(pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monet",
        description="Train a PyTorch model within a memory budget at the least added time.",
        epilog="Budgets: a fraction of the unoptimised peak (0.5), bytes (400000000) "
               "or a size with a unit (300MiB, 4GB).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="optimise a zoo model, print the report, train 3 steps",
        description="Optimise a zoo model (random data, seed 0) for a budget, print the "
                    "measured report and train a few SGD steps through the optimised module.",
    )
    demo.add_argument("--model", default=DEMO_MODEL, help=f"zoo model name (default {DEMO_MODEL})")
    demo.add_argument("--batch", type=int, default=None, help="batch size (default: the model's)")
    demo.add_argument("--budget", type=budget_arg, default=0.5,
                      help="memory budget of a training step (default 0.5)")
    demo.add_argument("--time-limit", type=float, default=20.0,
                      help="seconds the solver may take (default 20)")
    demo.add_argument("--steps", type=int, default=3, help="training steps to run (default 3)")
    demo.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    demo.add_argument("--timing-repeats", type=int, default=3,
                      help="interleaved timed steps per method for the overhead (default 3)")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: torch's choice)")
    demo.add_argument("-v", "--verbose", action="store_true",
                      help="show profiling progress and the solver's log on stderr")
    demo.set_defaults(run=cmd_demo)

    profile = commands.add_parser(
        "profile", help="capture and profile a zoo model; write its problem JSON",
        description="Capture a zoo model's training step, profile every operator and write "
                    "the scheduling problem (no solving).",
    )
    profile.add_argument("model", help="zoo model name (see monet.models.names())")
    profile.add_argument("--batch", type=int, default=None,
                         help="batch size (default: the model's)")
    profile.add_argument("--budget", type=budget_arg, default=None,
                         help="budget to store in the problem (default: none)")
    profile.add_argument("-o", "--output", type=Path, required=True, help="problem JSON to write")
    profile.add_argument("--lossy-variants", action="store_true",
                         help="also offer lossy variants (activations kept in bfloat16)")
    profile.add_argument("--attention-variants", action=argparse.BooleanOptionalAction,
                         default=True,
                         help="offer the chunked written-out attention (MViTv2; default: on)")
    profile.add_argument("-v", "--verbose", action="store_true", help="show profiling progress")
    profile.set_defaults(run=cmd_profile)

    solve = commands.add_parser(
        "solve", help="solve a problem JSON for a budget; write the schedule",
        description="Solve a problem file. A fractional budget is of the keep-everything "
                    "plan's predicted peak.",
    )
    solve.add_argument("problem", type=Path, help="problem JSON (from `monet profile`)")
    solve.add_argument("--budget", type=budget_arg, default=None,
                       help="budget (default: the one the problem carries)")
    solve.add_argument("--time-limit", type=float, default=30.0,
                       help="seconds per solve (default 30)")
    solve.add_argument("--backend", choices=["cpsat"], default="cpsat",
                       help="solver back end (default cpsat)")
    solve.add_argument("-o", "--output", type=Path, default=None, help="schedule JSON to write")
    solve.add_argument("--frontier", type=budget_list_arg, default=None, metavar="B1,B2,...",
                       help="solve each of these budgets and print a table instead")
    solve.add_argument("-v", "--verbose", action="store_true", help="show the solver's log")
    solve.set_defaults(run=cmd_solve)

    # The benchmarks parse their own arguments (see `monet bench --help`).
    benchmarks = {
        "bench": "monet beside checkpoint, torch.compile and RevViT on MODEL ... "
                 f"(benchmarks/peers.py; writes ./{BENCH_OUTPUT})",
        "report": "benchmarks/peers.py with its defaults: the committed report in "
                  "benchmarks/results/peers",
        "frontier": "benchmarks/checkpoint_frontier.py: monet's predicted and measured "
                    "peak per budget",
    }
    for name, help_text in benchmarks.items():
        commands.add_parser(name, add_help=False, help=help_text).set_defaults(run=None)
    return parser


def run_benchmark(command: str, argv: list[str]) -> int:
    """``monet bench|report|frontier ARGS``: the benchmark script's ``main`` on ``ARGS``."""
    if command == "frontier":
        return int(load_benchmark(FRONTIER, command).main(argv) or 0)
    peers = load_benchmark(PEERS, command)
    if command == "bench":
        return int(peers.main(argv, prog="monet bench", output_dir=BENCH_OUTPUT) or 0)
    return int(peers.main(argv, prog="monet report") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monet`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("bench", "report", "frontier"):
            return run_benchmark(args.command, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "solve" and args.frontier and args.output is not None:
            parser.error("-o writes one schedule; leave it out with --frontier")
        return args.run(args)
    except CommandError as error:
        print(f"monet: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        from monet.solver import InfeasibleBudgetError, ProblemFileError

        # An impossible budget or a schedule for another graph: the user can act on it.
        if isinstance(error, (InfeasibleBudgetError, ProblemFileError)):
            print(f"monet: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
