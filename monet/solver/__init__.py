"""Scheduling: a :class:`Problem` in, a :class:`Schedule` out. Imports no torch.

    >>> schedule = solve(problem, budget=4 << 30, time_limit=10)

Every strategy (the exact program, the baselines) returns a ``Schedule``
whose ``predicted_peak`` is the simulator's peak for that schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from monet.simulate import simulate
from monet.solver.bound import budget_lower_bound, time_lower_bound
from monet.solver.coarsen import coarsen
from monet.solver.heuristic import (
    Candidate,
    best_within,
    fastest_variants,
    least_peak,
    lower_peak,
    relax_and_repair,
    scan,
    variant_seconds,
)
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

BACKENDS = ("cpsat", "milp")
RELAXATION_SHARE = 0.35
"""Share of ``solve``'s time limit for the interval relaxation (bound and repaired starts)
and the repair on the simulator."""
DESCENT_SHARE = 0.25
"""Share of ``minimum_budget``'s time limit for the greedy descent on the peak."""


def _backend(name: str):
    """The exact solver function of a back end (both share one signature)."""
    if name == "cpsat":
        return solve_cpsat
    if name == "milp":
        from monet.solver.milp import solve_milp  # cvxpy is slow to import

        return solve_milp
    raise ValueError(f"unknown solver backend {name!r}; available: {', '.join(BACKENDS)}")


def _finish(
    problem: Problem,
    kept: tuple[int, ...],
    recompute: tuple[tuple[int, int], ...],
    budget: int | None,
    status: str,
    backend: str,
    bound: float | None = None,
    seconds: float = 0.0,
    variants: tuple[int, ...] = (),
) -> Schedule:
    variants = tuple(variants) or problem.default_variants()
    draft = Schedule(problem.graph_hash, budget, kept, recompute, 0, 0.0, status, backend,
                     variants=variants)
    peak = simulate(problem, build_program(problem, draft)).peak
    structure = analyse(problem.apply(variants))
    overhead = sum(structure.cost[a] for a, _ in recompute) + variant_seconds(problem, variants)
    return Schedule(
        problem.graph_hash, budget, kept, recompute, peak, overhead, status, backend,
        bound, seconds, variants=variants,
    )


def keep_all(problem: Problem, variants: tuple[int, ...] | None = None) -> Schedule:
    """The eager baseline: keep every forward storage the backward reads, recompute nothing.

    ``variants`` default to the captured implementations (the eager step).
    """
    variants = problem.default_variants() if variants is None else tuple(variants)
    structure = analyse(problem.apply(variants))
    kept = tuple(s for s in structure.decision_storages if s in structure.first_read)
    return _finish(problem, kept, (), None, "heuristic", "keep-all", 0.0, variants=variants)


def _from_candidate(
    problem: Problem, candidate: Candidate, budget: int | None, status: str, seconds: float
) -> Schedule:
    return Schedule(
        problem.graph_hash, budget, candidate.kept, candidate.recompute, candidate.peak,
        candidate.overhead, status, "heuristic", None, seconds, variants=candidate.variants,
    )


def minimum_budget(
    problem: Problem,
    time_limit: float = 10.0,
    stop_at: int | None = None,
    candidates: list[Candidate] | None = None,
    backend: str = "cpsat",
    coarsen_first: bool = True,
) -> tuple[Schedule, int]:
    """The schedule of least peak found, and a lower bound on any schedule's peak.

    The schedule's ``budget`` is the smallest budget ``solve`` accepts for it.
    With ``stop_at``, the search ends as soon as a schedule fits that. With
    ``coarsen_first`` (and no ``candidates``, which belong to ``problem``), the
    search runs on the exact coarsening, as ``solve`` does: on the zoo's
    graphs a smaller model lets CP-SAT go much further in the same time.
    """
    if coarsen_first and candidates is None:
        coarse = coarsen(problem)
        if len(coarse.problem.nodes) < len(problem.nodes):
            found, _ = minimum_budget(coarse.problem, time_limit, stop_at, None, backend,
                                      coarsen_first=False)
            expanded = coarse.expand(found)
            # The floor is proven on this problem, not on the coarse one.
            return replace(expanded, budget=expanded.predicted_peak), budget_lower_bound(problem)
    started = time.perf_counter()
    candidates = scan(problem) if candidates is None else candidates
    start = least_peak(candidates)
    if start is not None and (stop_at is None or start.peak > stop_at):
        # A greedy descent from the least peak reaches lower ones in a second or
        # two; CP-SAT then starts from there.
        applied = problem.apply(start.variants or problem.default_variants())
        deadline = time.perf_counter() + DESCENT_SHARE * time_limit
        start = replace(lower_peak(applied, replace(start, variants=()), deadline),
                        variants=start.variants)
    if start is not None and stop_at is not None and start.peak <= stop_at:
        return _from_candidate(problem, start, start.peak, "heuristic", 0.0), budget_lower_bound(
            problem
        )
    hint = None if start is None else start.hint
    remaining = max(0.5, time_limit - (time.perf_counter() - started))
    solution = _backend(backend)(problem, None, remaining, hint=hint, stop_at=stop_at)
    found = solution.status in ("optimal", "feasible")
    lower = max(int(solution.bound or 0) if found else 0, budget_lower_bound(problem))
    seconds = time.perf_counter() - started
    if not found or (start is not None and start.peak < (solution.capacity or 0)):
        if start is None:
            raise RuntimeError(f"the minimum-budget model found no schedule ({solution.status})")
        return _from_candidate(problem, start, start.peak, "heuristic", seconds), lower
    # CP-SAT's capacity is the budget it certified; the simulated peak can be
    # lower (its model sums the workspaces of recomputations in one slot).
    schedule = _finish(
        problem, solution.kept, solution.recompute, solution.capacity, solution.status,
        f"{backend}-min-peak", None, seconds, solution.variants,
    )
    return schedule, lower


def solve(
    problem: Problem,
    budget: int | None = None,
    time_limit: float = 10.0,
    backend: str = "cpsat",
    progress: Callable[[str], None] | None = None,
    coarsen_first: bool = True,
) -> Schedule:
    """The schedule of least added time whose peak fits ``budget`` (default: the problem's).

    With ``coarsen_first``, the exact folds of :mod:`monet.solver.coarsen` (views,
    never-recomputed chains) shrink the problem first, and the answer is expanded
    back and re-simulated on this problem.

    The ranked-recomputation heuristic gives a feasible start in well under a
    second; the exact back end (``"cpsat"``, OR-tools CP-SAT, or ``"milp"``,
    HiGHS through cvxpy, for graphs up to a few hundred nodes) improves on it
    within ``time_limit`` and bounds the gap.
    Raises :class:`InfeasibleBudgetError`, naming the smallest budget found
    feasible, when none fits.
    """
    exact = _backend(backend)
    budget = problem.budget if budget is None else budget
    if budget is None:
        raise ValueError("no budget: pass one or put it in the problem")
    if coarsen_first:
        coarse = coarsen(problem)
        if len(coarse.problem.nodes) < len(problem.nodes):
            return coarse.expand(
                solve(coarse.problem, budget, time_limit, backend, progress, coarsen_first=False)
            )
    started = time.perf_counter()
    baseline = keep_all(problem, fastest_variants(problem))
    if baseline.predicted_peak <= budget:
        # Keeping everything with the fastest variants adds the least time there
        # is: it is optimal whenever it fits.
        return replace(
            baseline, budget=budget, status="optimal", bound=baseline.predicted_overhead,
            solve_seconds=time.perf_counter() - started,
        )
    candidates = scan(problem)
    repaired, relaxation_bound = relax_and_repair(problem, budget, RELAXATION_SHARE * time_limit)
    start = best_within(candidates + repaired, budget)
    if start is not None and math.isfinite(relaxation_bound) and (
        start.overhead <= relaxation_bound + 1e-12
    ):
        # The relaxation's answer fits and costs its proven lower bound: optimal.
        return replace(
            _from_candidate(problem, start, budget, "optimal", time.perf_counter() - started),
            bound=start.overhead,
        )
    if start is not None:
        fallback = _from_candidate(problem, start, budget, "heuristic", 0.0)
    else:
        # Nothing quick fits: search for any schedule that does, for up to half
        # the time; it also says whether the budget can be met at all.
        fallback, lower = minimum_budget(
            problem, max(0.5, 0.5 * time_limit), stop_at=budget, candidates=candidates,
            backend=backend,
        )
        if fallback.budget > budget and fallback.status != "optimal" and lower <= budget:
            # Not proven impossible: keep looking with the rest of the time.
            remaining = max(0.5, time_limit - (time.perf_counter() - started))
            fallback, lower = minimum_budget(problem, remaining, stop_at=budget,
                                             candidates=candidates, backend=backend)
            if fallback.budget > budget and lower <= budget and fallback.status != "optimal":
                raise InfeasibleBudgetError(
                    budget, fallback.budget, lower, searched=time.perf_counter() - started
                )
        if fallback.budget > budget:
            raise InfeasibleBudgetError(budget, fallback.budget, lower)
    remaining = max(0.5, time_limit - (time.perf_counter() - started))
    solution = exact(
        problem, budget, remaining, hint=(fallback.kept, fallback.recompute, fallback.variants),
        log_callback=progress,
    )
    seconds = time.perf_counter() - started
    # The solver's own bound is weak on large graphs (CP-SAT's relaxation of a
    # cumulative constraint); the interval relaxation's and the knapsack's are
    # valid too and usually far stronger.
    found = solution.bound if solution.bound is not None else -math.inf
    bound = max(found, time_lower_bound(problem, budget), relaxation_bound)
    # Rounding to integer nanoseconds can lift the solver's bound a hair above
    # the true optimum; it never exceeds the best schedule found.
    bound = min(bound, fallback.predicted_overhead)
    if solution.status not in ("optimal", "feasible"):
        return replace(fallback, budget=budget, status="heuristic", bound=bound,
                       solve_seconds=seconds)
    schedule = _finish(
        problem, solution.kept, solution.recompute, budget, solution.status, backend,
        bound, seconds, solution.variants,
    )
    schedule = replace(schedule, bound=min(bound, schedule.predicted_overhead))
    if schedule.predicted_peak > budget:
        raise AssertionError(
            f"the solver's model admitted a schedule whose simulated peak "
            f"{schedule.predicted_peak} exceeds the budget {budget}: a bug in ilp.py"
        )
    if fallback.predicted_overhead < schedule.predicted_overhead:
        # CP-SAT stopped before matching its start point (hints are not binding).
        return replace(fallback, budget=budget, status="feasible", bound=bound,
                       solve_seconds=seconds)
    return schedule
