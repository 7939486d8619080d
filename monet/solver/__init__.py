"""Scheduling: a :class:`Problem` in, a :class:`Schedule` out. Imports no torch.

    >>> schedule = solve(problem, budget=4 << 30, time_limit=10)

Every strategy (the exact program, the baselines) returns a ``Schedule``
whose ``predicted_peak`` is the simulator's peak for that schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from monet.simulate import simulate
from monet.solver.ilp import analyse, solve_cpsat
from monet.solver.problem import Node, Problem, ProblemFileError
from monet.solver.program import Program, ScheduleError, build_program
from monet.solver.schedule import InfeasibleBudgetError, Schedule, format_bytes

__all__ = [
    "InfeasibleBudgetError",
    "Node",
    "Problem",
    "ProblemFileError",
    "Program",
    "Schedule",
    "ScheduleError",
    "build_program",
    "format_bytes",
    "keep_all",
    "minimum_budget",
    "solve",
]


def _finish(
    problem: Problem,
    kept: tuple[int, ...],
    recompute: tuple[tuple[int, int], ...],
    budget: int | None,
    status: str,
    backend: str,
    bound: float | None = None,
    seconds: float = 0.0,
) -> Schedule:
    draft = Schedule(problem.graph_hash, budget, kept, recompute, 0, 0.0, status, backend)
    peak = simulate(problem, build_program(problem, draft)).peak
    structure = analyse(problem)
    overhead = sum(structure.cost[a] for a, _ in recompute)
    return Schedule(
        problem.graph_hash, budget, kept, recompute, peak, overhead, status, backend,
        bound, seconds,
    )


def keep_all(problem: Problem) -> Schedule:
    """The eager baseline: keep every forward storage the backward reads, recompute nothing."""
    structure = analyse(problem)
    kept = tuple(s for s in structure.decision_storages if s in structure.first_read)
    return _finish(problem, kept, (), None, "heuristic", "keep-all", 0.0)


def minimum_budget(
    problem: Problem, time_limit: float = 10.0, stop_at: int | None = None
) -> tuple[Schedule, int]:
    """The schedule of least peak found, and a lower bound on any schedule's peak.

    With ``stop_at``, the search ends as soon as a schedule peaks at most that.
    """
    solution = solve_cpsat(problem, None, time_limit, stop_at=stop_at)
    if solution.status not in ("optimal", "feasible"):
        raise RuntimeError(f"the minimum-budget model found no schedule ({solution.status})")
    # The schedule's budget is the capacity the solver certified for it: the
    # smallest budget ``solve`` accepts for this schedule. Its simulated peak can
    # be lower (the model sums the workspaces of recomputations in one slot).
    schedule = _finish(
        problem, solution.kept, solution.recompute, solution.capacity, solution.status,
        "cpsat-min-peak", None, solution.seconds,
    )
    return schedule, int(solution.bound or 0)


def solve(
    problem: Problem,
    budget: int | None = None,
    time_limit: float = 10.0,
    backend: str = "cpsat",
    progress: Callable[[str], None] | None = None,
) -> Schedule:
    """The schedule of least added time whose peak fits ``budget`` (default: the problem's).

    Raises :class:`InfeasibleBudgetError`, naming the smallest budget found
    feasible, when none fits.
    """
    if backend != "cpsat":
        raise ValueError(f"unknown solver backend {backend!r}; available: 'cpsat'")
    budget = problem.budget if budget is None else budget
    if budget is None:
        raise ValueError("no budget: pass one or put it in the problem")
    started = time.perf_counter()
    baseline = keep_all(problem)
    if baseline.predicted_peak <= budget:
        # Keeping everything costs nothing: it is optimal whenever it fits.
        return Schedule(
            problem.graph_hash, budget, baseline.kept, (), baseline.predicted_peak, 0.0,
            "optimal", "keep-all", 0.0, time.perf_counter() - started,
        )
    # Least peak first: it says at once whether the budget can be met, and its
    # schedule is a feasible start for the time objective (CP-SAT struggles to
    # find a first feasible point under a tight budget on its own).
    least, lower = minimum_budget(problem, max(0.5, 0.5 * time_limit), stop_at=budget)
    if least.budget > budget and least.status != "optimal" and lower <= budget:
        # Not proven impossible: keep looking for any schedule that fits.
        remaining = max(0.5, time_limit - (time.perf_counter() - started))
        least, lower = minimum_budget(problem, remaining, stop_at=budget)
        if least.budget > budget and lower <= budget and least.status != "optimal":
            raise InfeasibleBudgetError(
                budget, least.budget, lower, searched=time.perf_counter() - started
            )
    if least.budget > budget:
        raise InfeasibleBudgetError(budget, least.budget, lower)
    remaining = max(0.5, time_limit - (time.perf_counter() - started))
    solution = solve_cpsat(
        problem, budget, remaining, hint=(least.kept, least.recompute), log_callback=progress
    )
    if solution.status not in ("optimal", "feasible"):
        return Schedule(
            problem.graph_hash, budget, least.kept, least.recompute, least.predicted_peak,
            least.predicted_overhead, "heuristic", "cpsat-min-peak", None,
            time.perf_counter() - started,
        )
    schedule = _finish(
        problem, solution.kept, solution.recompute, budget, solution.status, "cpsat",
        solution.bound, time.perf_counter() - started,
    )
    if schedule.predicted_peak > budget:
        raise AssertionError(
            f"the solver's model admitted a schedule whose simulated peak "
            f"{schedule.predicted_peak} exceeds the budget {budget}: a bug in ilp.py"
        )
    return schedule
