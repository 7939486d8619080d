"""pytest-benchmark suite: solve time against problem size, both back ends.

    python -m pytest benchmarks/bench_solver.py --benchmark-only [--benchmark-json out.json]

Random layered training-step graphs (``monet.solver.random_graphs``) of about
100, 300 and 1,000 nodes, with operator-variant choices, at 0.7 of their
keep-everything peak; the MILP only where it is meant to be used (≤ ~300
nodes). ``extra_info`` carries the nodes, the added time found, the bound and
the gap. Not run by CI (``testpaths`` is ``tests``).
"""

from __future__ import annotations

import pytest

from monet.solver import keep_all, solve
from monet.solver.random_graphs import random_problem, with_random_choices

SIZES = {"100 nodes": 50, "300 nodes": 150, "1000 nodes": 500}
TIME_LIMIT = 10.0


@pytest.mark.parametrize("backend", ["cpsat", "milp"])
@pytest.mark.parametrize("size", list(SIZES))
def test_solve(benchmark, size, backend):
    if backend == "milp" and SIZES[size] > 150:
        pytest.skip("the MILP back end is for graphs up to about 300 nodes")
    problem = with_random_choices(random_problem(SIZES[size], seed=1), seed=1, count=8)
    budget = int(0.7 * keep_all(problem).predicted_peak)
    schedule = benchmark.pedantic(
        solve, (problem, budget), {"time_limit": TIME_LIMIT, "backend": backend},
        rounds=3, iterations=1,
    )
    benchmark.extra_info.update(
        nodes=len(problem.nodes), choices=len(problem.choices), status=schedule.status,
        added_ms=1e3 * schedule.predicted_overhead,
        bound_ms=None if schedule.bound is None else 1e3 * schedule.bound, gap=schedule.gap,
    )
    assert schedule.predicted_peak <= budget
