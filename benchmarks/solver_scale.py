"""Solver at scale: solve time, objective, bound and gap against graph size, per back end.

    python benchmarks/solver_scale.py                       # random layered graphs
    python benchmarks/solver_scale.py --problems p.json     # plus problems from `monet profile`

For each problem and each budget (a fraction of the keep-everything peak) it
prints the node count, the heuristic's and each back end's added time, the
back end's bound and gap, and the wall time; results go to
``benchmarks/results/solver_scale.{csv,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import pandas as pd

from monet.solver import InfeasibleBudgetError, Problem, keep_all, solve
from monet.solver.heuristic import best_within, scan
from monet.solver.random_graphs import random_problem

RESULTS = Path(__file__).parent / "results"
MILP_MAX_NODES = 300


def _rows(problem: Problem, label: str, budgets: list[float], backends: list[str],
          time_limit: float):
    peak = keep_all(problem).predicted_peak
    started = time.perf_counter()
    candidates = scan(problem)
    heuristic_seconds = time.perf_counter() - started
    for fraction in budgets:
        budget = int(peak * fraction)
        quick = best_within(candidates, budget)
        for backend in backends:
            if backend == "milp" and len(problem.nodes) > MILP_MAX_NODES:
                continue
            print(f"  {label} {fraction} {backend} ...", file=sys.stderr, flush=True)
            row = {
                "problem": label, "nodes": len(problem.nodes), "budget": fraction,
                "backend": backend,
                "heuristic ms": None if quick is None else round(1e3 * quick.overhead, 3),
                "heuristic s": round(heuristic_seconds, 2),
            }
            started = time.perf_counter()
            try:
                schedule = solve(problem, budget, time_limit=time_limit, backend=backend)
            except InfeasibleBudgetError as error:
                row.update(status=f"infeasible (min {error.minimum / peak:.2f})")
            else:
                row.update(
                    status=schedule.status,
                    **{"added ms": round(1e3 * schedule.predicted_overhead, 3),
                       "bound ms": None if schedule.bound is None
                       else round(1e3 * schedule.bound, 3),
                       "gap %": None if schedule.gap is None else round(100 * schedule.gap, 2),
                       "peak / keep-all": round(schedule.predicted_peak / peak, 3)},
                )
            row["solve s"] = round(time.perf_counter() - started, 2)
            yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,3000",
                        help="node counts of random layered graphs (about two nodes per op)")
    parser.add_argument("--problems", nargs="*", default=[],
                        help="problem JSON files written by `monet profile`")
    parser.add_argument("--budgets", default="0.7,0.5,0.3",
                        help="fractions of the keep-everything peak")
    parser.add_argument("--backends", default="cpsat,milp")
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    backends = args.backends.split(",")
    problems = [(f"random {n}", random_problem(max(2, n // 2), seed=n))
                for n in (int(s) for s in args.sizes.split(",") if s)]
    problems += [(Path(p).stem, Problem.load(p)) for p in args.problems]
    rows = []
    for label, problem in problems:
        rows.extend(_rows(problem, label, budgets, backends, args.time_limit))
    table = pd.DataFrame(rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output_dir / "solver_scale.csv", index=False)
    from monet.cli import markdown_table

    header = (
        f"# Solver at scale\n\n{datetime.date.today()}, {platform.platform()}, "
        f"time limit {args.time_limit} s per solve (heuristic start included).\n\n"
    )
    table = table.astype(object).where(table.notna(), "")
    text = markdown_table(list(table.columns), table.values.tolist())
    (args.output_dir / "solver_scale.md").write_text(header + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
