"""Solver at scale: solve time, objective, bound and gap against graph size, per back end.

    python benchmarks/solver_scale.py                       # random layered graphs
    python benchmarks/solver_scale.py --models convnext_t   # plus zoo models, standard batch
    python benchmarks/solver_scale.py --problems p.json     # plus problems from `monet profile`

For each problem, each budget (a fraction of the keep-everything peak) and
each coarsening (``off``, ``exact``: the folds that keep the optimum,
``approximate``: those plus backward views) it prints the node count before
and after coarsening, the heuristic's and each back end's added time, the
bound and gap, and the wall time. A coarsened solve runs on the coarse problem
and is expanded back: its added time, bound, gap and peak are the original
problem's. Results go to ``benchmarks/results/solver_scale.{csv,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
import time
from pathlib import Path

import pandas as pd

from monet.solver import InfeasibleBudgetError, Problem, Schedule, keep_all, solve
from monet.solver.coarsen import CoarsenOptions, coarsen
from monet.solver.heuristic import best_within, scan
from monet.solver.random_graphs import random_problem

RESULTS = Path(__file__).parent / "results"
MILP_MAX_NODES = 1000
"""The MILP back end's time-indexed model is quadratic in the graph: on the random
1,000-node graph (847 coarse nodes) at 0.5 it takes 15 s and 1.3 GB for a 10 s limit and
returns the heuristic's answer; 3,000 nodes would take about ten times that memory."""
COARSENING = {
    "off": None,
    "exact": CoarsenOptions(),
    "approximate": CoarsenOptions(backward_aliases=True),
}


def zoo_problem(name: str, directory: Path, refresh: bool = False) -> Problem:
    """The problem ``monet profile`` writes for zoo model ``name`` at its standard batch
    (written once into ``directory``, then read back), its budget the peak a fraction
    1.0 means to ``monet.optimize``: eager's measured peak, or keep-everything's where
    that is larger. A file without one is profiled again."""
    path = directory / f"{name}.json"
    problem = None if refresh or not path.exists() else Problem.load(path)
    if problem is None or problem.budget is None:
        from monet.cli import main

        with contextlib.redirect_stdout(sys.stderr):
            if main(["profile", name, "--budget", "1.0", "-o", str(path)]) != 0:
                raise SystemExit(f"monet profile {name} failed")
        problem = Problem.load(path)
    return problem


def _solve(problem: Problem, mode: str, budget: int, backend: str,
           time_limit: float) -> Schedule:
    """The schedule of ``problem``: as captured (``off``), as ``solve`` does it (``exact``:
    coarsening and expansion within the time limit), or solved on the approximate
    coarsening and expanded back."""
    if mode in ("off", "exact"):
        return solve(problem, budget, time_limit=time_limit, backend=backend,
                     coarsen_first=mode == "exact")
    coarse = coarsen(problem, COARSENING[mode])
    return coarse.expand(solve(coarse.problem, budget, time_limit=time_limit, backend=backend,
                               coarsen_first=False))


def _rows(problem: Problem, label: str, budgets: list[float], backends: list[str],
          modes: list[str], time_limit: float):
    peak = keep_all(problem).predicted_peak
    # Budgets are fractions of the larger of eager's measured peak (the problem's budget,
    # where `monet profile --budget 1.0` wrote it) and keep-everything's.
    reference = max(problem.budget or 0, peak)
    base = "eager" if reference > peak else "keep-all"
    # The captured step's time: every node once, as profiled (the objective a MIP solver's
    # own relative gap would be taken over, were the step time minimised).
    step = sum(n.time for n in problem.nodes if n.phase in ("forward", "backward"))
    started = time.perf_counter()
    candidates = scan(problem)
    heuristic_seconds = time.perf_counter() - started
    coarse_nodes = {
        mode: len(coarsen(problem, COARSENING[mode]).problem.nodes) if COARSENING[mode]
        else len(problem.nodes)
        for mode in modes
    }
    for fraction in budgets:
        budget = int(reference * fraction)
        quick = best_within(candidates, budget)
        for backend in backends:
            for mode in modes:
                row = {
                    "problem": label, "nodes": len(problem.nodes), "coarsen": mode,
                    "nodes solved": coarse_nodes[mode], "budget": fraction,
                    "of": base, "backend": backend,
                    "heuristic ms": None if quick is None else round(1e3 * quick.overhead, 3),
                    "heuristic s": round(heuristic_seconds, 2),
                }
                if backend == "milp" and coarse_nodes[mode] > MILP_MAX_NODES:
                    row.update(status=f"not run: over {MILP_MAX_NODES} nodes")
                    yield row
                    continue
                print(f"  {label} {fraction} {backend} {mode} ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                try:
                    schedule = _solve(problem, mode, budget, backend, time_limit)
                except InfeasibleBudgetError as error:
                    # Proven (no schedule below the bound) or only not found in time.
                    least = f"least found {error.minimum / reference:.2f}"
                    below = f"none below {(error.lower_bound or 0) / reference:.2f}"
                    row.update(status=f"infeasible ({below}; {least})" if error.proven
                               else f"none found ({least}; {below})")
                else:
                    row.update(
                        status=schedule.status,
                        **{"added ms": round(1e3 * schedule.predicted_overhead, 3),
                           "bound ms": None if schedule.bound is None
                           else round(1e3 * schedule.bound, 3),
                           "floor ms": round(1e3 * schedule.floor, 3),
                           "gap %": None if schedule.gap is None
                           else round(100 * schedule.gap, 2),
                           "step gap %": None if schedule.bound is None else round(
                               100 * (schedule.predicted_overhead - max(
                                   schedule.bound, schedule.floor))
                               / (step + schedule.predicted_overhead), 2),
                           "peak / budget's base": round(
                               schedule.predicted_peak / reference, 3),
                           "peak / keep-all": round(schedule.predicted_peak / peak, 3)},
                    )
                row["solve s"] = round(time.perf_counter() - started, 2)
                yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,3000",
                        help="node counts of random layered graphs (about two nodes per op)")
    parser.add_argument("--models", default="",
                        help="zoo models, comma-separated, profiled at their standard batch "
                             "with `monet profile` (e.g. convnext_t,mvitv2_t)")
    parser.add_argument("--problem-dir", type=Path, default=None,
                        help="where the zoo models' problem files are kept "
                             "(default: the monet cache directory)")
    parser.add_argument("--refresh", action="store_true",
                        help="profile the zoo models again even if their problem files exist")
    parser.add_argument("--problems", nargs="*", default=[],
                        help="problem JSON files written by `monet profile` (with `--budget "
                             "1.0`, budgets are fractions of eager's peak)")
    parser.add_argument("--budgets", default="0.7,0.5,0.3",
                        help="fractions of eager's measured peak (zoo models) or of "
                             "keep-everything's (random graphs, problems without a budget)")
    parser.add_argument("--backends", default="cpsat,milp")
    parser.add_argument("--coarsen", default="off,exact,approximate",
                        help=f"coarsenings to compare, of {', '.join(COARSENING)}")
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--note", default="", help="a line to add to the report's header")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    backends = args.backends.split(",")
    modes = args.coarsen.split(",")
    unknown = set(modes) - set(COARSENING)
    if unknown:
        parser.error(f"unknown coarsening {', '.join(sorted(unknown))}")
    problems = [(f"random {n}", random_problem(max(2, n // 2), seed=n))
                for n in (int(s) for s in args.sizes.split(",") if s)]
    if args.models:
        from monet.profile import default_cache_path

        directory = args.problem_dir or default_cache_path().parent / "problems"
        directory.mkdir(parents=True, exist_ok=True)
        problems += [(name, zoo_problem(name, directory, args.refresh))
                     for name in args.models.split(",")]
    problems += [(Path(p).stem, Problem.load(p)) for p in args.problems]
    rows = []
    for label, problem in problems:
        rows.extend(_rows(problem, label, budgets, backends, modes, args.time_limit))
    table = pd.DataFrame(rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output_dir / "solver_scale.csv", index=False)
    from monet.cli import markdown_table

    header = (
        f"# Solver at scale\n\n{datetime.date.today()}, {platform.platform()}, "
        f"time limit {args.time_limit} s per solve (heuristic start included; coarsening "
        "and expansion included in `solve s`).\n\n"
        "`coarsen`: `off` solves the problem as captured; `exact` folds views and "
        "never-recomputed chains (the optimum is unchanged); `approximate` also folds "
        "backward views. Added time, bound, gap and peak are always the original "
        "problem's. `floor ms` is the added time of the fastest variants with nothing "
        "recomputed (negative where variants beat the captured ops); the gap is "
        "(added − bound) / (added − floor). `step gap %` is the same difference over the "
        "whole step's predicted time (the captured step's profiled node times plus the "
        "added time): the relative gap a MIP solver reports when the objective is the "
        "step's time, as in Checkmate and MONeT. A budget no schedule was found within "
        "is `infeasible` where that is proven (`none below`: the knapsack's or the "
        "relaxation's bound on any schedule's peak, or the least-peak search's optimum) "
        "and `none found` where the search ran out of time; both give the least peak "
        "found. `of`: what the budget is a fraction of, the larger of eager's measured "
        "peak (`eager`: `monet profile --budget 1.0` stores it as the problem's budget) "
        "and the keep-everything schedule's predicted peak (`keep-all`: the random graphs, "
        "and a zoo model whose eager peak is below it, as the reversible RevViT's, whose "
        "eager step rebuilds its activations). Where eager's is larger, `peak / keep-all` "
        "is the stricter view. "
        "Infeasibility's fractions are of the budget's base.\n\n"
        + (f"{args.note}\n\n" if args.note else "")
    )
    table = table.astype(object).where(table.notna(), "")
    text = markdown_table(list(table.columns), table.values.tolist())
    (args.output_dir / "solver_scale.md").write_text(header + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
