"""The MILP back end (cvxpy/HiGHS) against CP-SAT: same optima, schedules that fit."""

from __future__ import annotations

import time

import pytest

from monet.simulate import simulate
from monet.solver import Schedule, build_program, keep_all
from monet.solver.ilp import Solution, analyse, solve_cpsat
from monet.solver.milp import model_profile, solve_milp
from monet.solver.random_graphs import random_problem

CASES = [(5, seed) for seed in range(5)] + [(12, seed) for seed in range(3)]


def simulated_peak(problem, solution: Solution, budget: int | None) -> int:
    """The simulator's peak of a solution, built into a schedule as ``solve`` does."""
    draft = Schedule(problem.graph_hash, budget, solution.kept, solution.recompute, 0, 0.0,
                     solution.status, "milp")
    return simulate(problem, build_program(problem, draft)).peak


@pytest.mark.parametrize(("forward_ops", "seed"), CASES)
def test_milp_optimum_equals_cpsat(forward_ops, seed):
    problem = random_problem(forward_ops, seed=seed)
    # A dead-end op (no output needs it) is counted in the model's forward, where the
    # program may skip it: the model's optimum is then only proven for its schedules.
    exact = analyse(problem).exact
    proven = "optimal" if exact else "feasible"
    least = solve_milp(problem, None, time_limit=10)
    assert least.status == proven
    assert least.capacity == solve_cpsat(problem, None, time_limit=10).capacity
    assert least.objective == least.capacity
    assert least.bound == (least.capacity if exact else None)
    low = least.capacity
    assert simulated_peak(problem, least, low) <= low
    high = keep_all(problem).predicted_peak
    for budget in sorted({high, (high + low) // 2, low}):
        milp = solve_milp(problem, budget, time_limit=10)
        cpsat = solve_cpsat(problem, budget, time_limit=10)
        assert milp.status == cpsat.status == proven
        assert milp.objective == pytest.approx(cpsat.objective, abs=1e-9)
        if exact:
            assert milp.bound == pytest.approx(milp.objective, abs=1e-9)
        assert milp.capacity is None
        assert max(model_profile(problem, milp.kept, milp.recompute)) <= budget
        assert simulated_peak(problem, milp, budget) <= budget
    below = solve_milp(problem, low - 1, time_limit=10)
    assert below.status == ("infeasible" if exact else "unknown")
    assert below.kept == below.recompute == ()


@pytest.mark.parametrize("seed", range(3))
def test_milp_with_workspaces_and_random_ops(seed):
    problem = random_problem(15, seed=seed, workspace_probability=0.4, random_probability=0.2)
    least = solve_milp(problem, None, time_limit=10)
    assert least.capacity == solve_cpsat(problem, None, time_limit=10).capacity
    high = keep_all(problem).predicted_peak
    budget = (high + least.capacity) // 2
    milp = solve_milp(problem, budget, time_limit=10)
    cpsat = solve_cpsat(problem, budget, time_limit=10)
    assert milp.status == cpsat.status == ("optimal" if analyse(problem).exact else "feasible")
    assert milp.objective == pytest.approx(cpsat.objective, abs=1e-9)
    assert simulated_peak(problem, milp, budget) <= budget
    redone = {a for a, _ in milp.recompute}
    assert all(problem.nodes[a].recomputable for a in redone)


def test_model_profile_agrees_with_cpsat():
    """The profile the MILP reads back certifies CP-SAT's own schedules too."""
    problem = random_problem(12, seed=4, workspace_probability=0.3)
    least = solve_cpsat(problem, None, time_limit=10)
    assert max(model_profile(problem, least.kept, least.recompute)) == least.capacity


def test_stop_at_and_log_callback():
    problem = random_problem(12, seed=1)
    high = keep_all(problem).predicted_peak
    lines: list[str] = []
    solution = solve_milp(problem, None, time_limit=10, stop_at=high, log_callback=lines.append)
    assert solution.status in ("optimal", "feasible")
    assert solution.capacity <= high
    assert any("HiGHS" in line for line in lines)


def test_time_limit_is_respected():
    problem = random_problem(150, seed=1)
    started = time.perf_counter()
    solution = solve_milp(problem, None, time_limit=1.0)
    assert time.perf_counter() - started < 1.0 + 3  # the limit, plus model building
    assert solution.status in ("optimal", "feasible", "unknown")
    if solution.status == "feasible":
        assert solution.bound <= solution.capacity
