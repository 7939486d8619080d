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
from functools import partial

from monet.simulate import simulate
from monet.solver.bound import budget_lower_bound, time_lower_bound
from monet.solver.coarsen import coarsen
from monet.solver.heuristic import (
    Candidate,
    best_within,
    evaluate,
    exchange,
    fastest_variants,
    fit_and_trim,
    leaner_at_peak,
    least_peak,
    lower_peak,
    recompute_seconds,
    relax_and_repair,
    scan,
    variant_seconds,
)
from monet.solver.ilp import analyse, solve_cpsat
from monet.solver.problem import Node, Problem, ProblemFileError
from monet.solver.program import Program, ScheduleError, build_program
from monet.solver.relaxation import BackgroundBound, budget_bound
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
    "eager_like",
    "format_bytes",
    "keep_all",
    "minimum_budget",
    "solve",
]

BACKENDS = ("cpsat", "milp")
RELAXATION_SHARE = 0.45
"""Share of ``solve``'s time limit for the interval relaxation (bound and repaired starts)
and the repair on the simulator. 0.3 from commit 17ec61b to a4306f2 (with CP-SAT's
neighbourhood step dropped, which stays out): on the random 3,000-node graph at 0.5 of
keep-all's peak its rounds then found no fitting answer in time (1,115 ms added against
121.6), and the ViT demo at 0.3 of eager's peak once found no schedule; two 10 s solves
each, 0.45 against 0.3: MViTv2-T at 0.5 68.3 / 70.1 against 67.9 / 67.9 ms, ConvNeXt-T at
0.5 58.4 / 64.3 against 58.4 / 58.4, SAM2 Hiera-T at 0.3 774.6 in all four."""
DESCENT_SHARE = 0.25
"""Share of ``minimum_budget``'s time limit for the greedy descent on the peak."""
SCAN_SHARE = 0.2
"""Share of the time limit for the heuristic scans (their evaluations stop when it is spent)."""
FIT_SHARE = 0.3
"""Share of ``solve``'s time limit for bringing the least-peak start within the budget
when nothing fits."""
NEAR_FIT = 1.15
"""A start this far over the budget, cheaper than any that fits, is brought within it...
(1.05 until 2026-12-07: MViTv2-T at 0.5 of eager's peak, profiled on one thread, then kept
a fitting 360 ms start where one 8% over adding 133 ms fits at 111; the zoo's other
solves at 0.7 / 0.5 / 0.3 came out the same either way)."""
NEAR_SAVING = 0.9
"""...when it adds at most this share of the best fitting start's time (above the floor)."""
EXCHANGE_SHARE = 0.35
"""Share of ``solve``'s time limit for the exchange search on the best start that fits."""
FALLBACK_SHARE = 0.5
"""Least share of ``solve``'s time limit for the search for any fitting schedule when no
quick start fits (the solve may then take up to half its limit longer)."""
FALLBACK_EXCHANGE = 0.5
"""Share of the time left after that search for the exchange search on what it found,
before the exact back end."""
JOINT_FIRST_SECONDS = 1.0
JOINT_FIRST_SHARE = 0.2
"""With a budget to reach, the joint model (variants free) tries first for this long, at
most this share of ``minimum_budget``'s time left..."""
FIXED_SHARE = 0.5
"""Share of ``minimum_budget``'s time left for the exact back end with the start's variants
fixed, before the joint model."""
BACKGROUND_SHARE = 0.75
"""Share of ``solve``'s time limit the relaxation's 0/1 program gets in a child process
for the bound (:class:`monet.solver.relaxation.BackgroundBound`), from the start: the
heuristics run on one core until about then (SAM2 Hiera-T at 0.5 of eager's peak:
139.5 ms proven; started with the exchange search instead, which then converged early,
it ran beside CP-SAT's two workers and proved nothing above the LP's 126.6)."""
BOUND_SHARE = 0.1
"""Share of ``minimum_budget``'s time limit for its bound on the least peak..."""
BOUND_SECONDS = 2.0
"""...and at most this many seconds (the relaxation's LP, bisected: 0.3-1.9 s on the zoo)."""
MIN_EXACT_SECONDS = 0.5
"""Below this much time left, the exact back end is not started (building its model alone
takes longer on the zoo's graphs); the best heuristic schedule is returned with its bound."""


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
    program = build_program(problem, draft)
    peak = simulate(problem, program).peak
    overhead = (recompute_seconds(analyse(problem.apply(variants)), program, recompute)
                + variant_seconds(problem, variants))
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


def eager_like(problem: Problem) -> Schedule:
    """The schedule closest to eager's step, adding no time: keep-all, with every op only
    the backward reads recomputed and not run in the forward, as eager's backward
    runs it (a reversible block's reconstruction), where that lowers the peak."""
    baseline = keep_all(problem)
    variants = problem.default_variants()
    applied = problem.apply(variants)
    structure = analyse(applied)
    skipped = set(structure.skippable) & structure.recomputable
    if not skipped:
        return baseline
    found = evaluate(applied, structure, skipped)
    if found is None or found.peak >= baseline.predicted_peak or found.overhead > 0:
        return baseline
    return _finish(problem, found.kept, found.recompute, None, "heuristic", "eager-like", 0.0,
                   variants=variants)


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
    The whole search, coarsening and the bound included, takes about ``time_limit``:
    the last ``BOUND_SHARE`` of it (at most ``BOUND_SECONDS``) goes to the bound.
    """
    reserve = min(BOUND_SECONDS, BOUND_SHARE * time_limit)
    started = time.perf_counter()
    found, lower = _least_peak(problem, time_limit - reserve, stop_at, candidates, backend,
                               coarsen_first)
    if lower < found.predicted_peak and (
            stop_at is None or lower <= stop_at < found.predicted_peak):
        # The relaxation's LP, bisected on the budget, bounds the peak better than the
        # knapsack (ViT demo 0.28 of keep-everything's peak against 0.26); not needed
        # where ``stop_at`` is met or already proven out of reach.
        bound = budget_bound(problem, max(0.0, started + time_limit - time.perf_counter()))
        lower = max(lower, min(bound, found.predicted_peak))
    return found, lower


def _least_peak(
    problem: Problem,
    time_limit: float,
    stop_at: int | None,
    candidates: list[Candidate] | None,
    backend: str,
    coarsen_first: bool,
) -> tuple[Schedule, int]:
    """:func:`minimum_budget`'s search, its bound the knapsack's or the exact back end's."""
    started = time.perf_counter()
    deadline = started + time_limit
    if coarsen_first and candidates is None:
        coarse = coarsen(problem)
        if len(coarse.problem.nodes) < len(problem.nodes):
            found, _ = _least_peak(coarse.problem, _left(deadline, reserve=started),
                                   stop_at, None, backend, coarsen_first=False)
            expanded = coarse.expand(found)
            # The floor is proven on this problem, not on the coarse one.
            return replace(expanded, budget=expanded.predicted_peak), budget_lower_bound(problem)
    if candidates is None:
        candidates = scan(problem, deadline=started + SCAN_SHARE * time_limit)
    start = least_peak(candidates)
    if start is not None and (stop_at is None or start.peak > stop_at):
        # A greedy descent from the least peak reaches lower ones in a second or
        # two; CP-SAT then starts from there. It starts from the least peak of each
        # variant vector (the leanest one's can stall above the captured ops' own).
        descent = min(deadline, time.perf_counter() + DESCENT_SHARE * time_limit)
        by_vector: dict[tuple[int, ...], Candidate] = {}
        for c in sorted(candidates, key=lambda c: c.peak):
            by_vector.setdefault(c.variants or problem.default_variants(), c)
        starts = list(by_vector.values())
        for done, begin in enumerate(starts):
            share = time.perf_counter() + (descent - time.perf_counter()) / (len(starts) - done)
            lowered = _on_applied(problem, begin, partial(lower_peak, deadline=share))
            if lowered is not None and lowered.peak < start.peak:
                start = lowered
            if stop_at is not None and start.peak <= stop_at:
                break
    if start is not None and stop_at is not None and start.peak <= stop_at:
        return _from_candidate(problem, start, start.peak, "heuristic", 0.0), budget_lower_bound(
            problem
        )
    remaining = _left(deadline)
    if start is not None and stop_at is not None and problem.choices and (
            start.peak <= NEAR_FIT * stop_at and remaining >= 4 * MIN_EXACT_SECONDS):
        # A budget a little below what the start's variants reach can be met at once
        # with others (the ViT demo at 0.3 of eager's peak: the joint model fits it in
        # 0.5 s, the start's variants alone none in 3.6 s). Further below, the least
        # peak matters more, and the start's variants alone reach lower ones first.
        joint = _least_peak_exact(problem, start, backend,
                                  min(JOINT_FIRST_SECONDS, JOINT_FIRST_SHARE * remaining),
                                  stop_at)
        if joint is not None and joint.peak < start.peak:
            start = joint
        if start.peak <= stop_at:
            return _from_candidate(problem, start, start.peak, "heuristic",
                                   time.perf_counter() - started), budget_lower_bound(problem)
        remaining = _left(deadline)
    if start is not None and problem.choices and remaining >= 2 * MIN_EXACT_SECONDS:
        # The joint model is larger and CP-SAT gets less far in the same time than on
        # the start's variants alone (the ViT demo: 40.3 MiB against 38.5 in 9 s);
        # solved there first, it hands the joint model a lower start.
        fixed = _on_applied(problem, start, lambda applied, plain: _least_peak_exact(
            applied, plain, backend, FIXED_SHARE * remaining, stop_at))
        if fixed is not None and fixed.peak < start.peak:
            start = fixed
        if stop_at is not None and start.peak <= stop_at:
            return _from_candidate(problem, start, start.peak, "heuristic",
                                   time.perf_counter() - started), budget_lower_bound(problem)
        remaining = _left(deadline)
    hint = None if start is None else start.hint
    if start is not None and remaining < MIN_EXACT_SECONDS:
        return (_from_candidate(problem, start, start.peak, "heuristic",
                                time.perf_counter() - started), budget_lower_bound(problem))
    solution = _backend(backend)(problem, None, max(remaining, MIN_EXACT_SECONDS), hint=hint,
                                 stop_at=stop_at)
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


def _least_peak_exact(problem: Problem, start: Candidate, backend: str, time_limit: float,
                      stop_at: int | None) -> Candidate | None:
    """The exact back end's least peak on ``problem``, from ``start``."""
    solution = _backend(backend)(problem, None, time_limit, hint=start.hint, stop_at=stop_at)
    if solution.status not in ("optimal", "feasible"):
        return None
    found = _finish(problem, solution.kept, solution.recompute, None, solution.status,
                    backend, variants=solution.variants)
    return Candidate.of(found)


def _left(deadline: float, reserve: float | None = None) -> float:
    """Seconds until ``deadline``; with ``reserve`` (when the work began), less as long
    again as has passed since, kept for mapping a coarse answer back."""
    now = time.perf_counter()
    left = deadline - now
    if reserve is not None:
        left -= now - reserve
    return max(left, 0.0)


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

    The heuristics give feasible starts in a fraction of ``time_limit``
    (``SCAN_SHARE``: the ranked-recomputation and checkpoint-style scans;
    ``RELAXATION_SHARE``: the interval relaxation's repaired answers and its
    bound; its 0/1 program proves a bound in a child process meanwhile); the
    exact back end (``"cpsat"``, OR-tools CP-SAT, or ``"milp"``, HiGHS through
    cvxpy, for graphs up to a few hundred nodes) improves on the
    best of them in the time left and bounds the gap. The whole solve, coarsening
    included, takes about ``time_limit``.
    Raises :class:`InfeasibleBudgetError`, naming the smallest budget found
    feasible, when none fits.
    """
    started = time.perf_counter()
    deadline = started + time_limit
    exact = _backend(backend)
    budget = problem.budget if budget is None else budget
    if budget is None:
        raise ValueError("no budget: pass one or put it in the problem")
    if coarsen_first:
        coarse = coarsen(problem)
        if len(coarse.problem.nodes) < len(problem.nodes):
            inner = solve(coarse.problem, budget, _left(deadline, reserve=started), backend,
                          progress, coarsen_first=False)
            return replace(coarse.expand(inner), solve_seconds=time.perf_counter() - started)
    baseline = keep_all(problem, fastest_variants(problem))
    floor = baseline.predicted_overhead
    if baseline.predicted_peak <= budget:
        # Keeping everything with the fastest variants adds the least time there
        # is: it is optimal whenever it fits.
        return replace(
            baseline, budget=budget, status="optimal", bound=floor, floor=floor,
            solve_seconds=time.perf_counter() - started,
        )
    background = BackgroundBound(problem, budget, BACKGROUND_SHARE * time_limit)
    candidates = scan(problem, deadline=started + SCAN_SHARE * time_limit)
    repaired, relaxation_bound = relax_and_repair(
        problem, budget, min(RELAXATION_SHARE * time_limit, _left(deadline)))
    start = best_within(candidates + repaired, budget)
    if start is not None and math.isfinite(relaxation_bound) and (
        start.overhead <= relaxation_bound + 1e-9
    ):
        # The relaxation's answer fits and costs its proven lower bound: optimal.
        return replace(
            _from_candidate(problem, start, budget, "optimal", time.perf_counter() - started),
            bound=start.overhead, floor=floor,
        )
    near = [c for c in candidates + repaired if budget < c.peak <= NEAR_FIT * budget and (
        start is None or c.overhead - floor < NEAR_SAVING * (start.overhead - floor))]
    if near:
        # A start a little over the budget and much cheaper than any that fits is
        # brought within it on the simulator (MViTv2-T at 0.5 of keep-all: the only
        # fitting start, a 0/1 solve cut short, adds 261 ms; one 4% over, 71 ms, fits
        # at 70). Where it saves little, the time goes to the exchange search instead.
        fitted = _fit(problem, min(near, key=lambda c: c.overhead), budget,
                      min(deadline, time.perf_counter() + FIT_SHARE * time_limit))
        if fitted is not None and (start is None or fitted.overhead < start.overhead):
            start = fitted
    if start is None:
        # Nothing quick fits: lower the least-peak start's peak on the simulator.
        start = _fit(problem, least_peak(candidates + repaired), budget,
                     min(deadline, time.perf_counter() + FIT_SHARE * time_limit))
    if start is not None:
        # Trade expensive recomputations for cheaper ones on the model's peak.
        exchange_until = min(deadline, time.perf_counter() + EXCHANGE_SHARE * time_limit)
        start = exchange(problem, start, budget, exchange_until)
        fallback = _from_candidate(problem, start, budget, "heuristic", 0.0)
    else:
        # Search for any schedule that fits; it also says whether the budget can be
        # met at all. The quick phases have spent most of the limit by now, and CP-SAT's
        # least-peak model needs seconds on the zoo's graphs (MViTv2-T: a budget 0.4 of
        # eager's peak refused, least found 375 MiB, where its own search finds 347).
        fallback, lower = minimum_budget(
            problem, max(_left(deadline), FALLBACK_SHARE * time_limit, MIN_EXACT_SECONDS),
            stop_at=budget,
            candidates=candidates, backend=backend,
        )
        if fallback.budget > budget:
            searched = None if fallback.status == "optimal" or lower > budget else (
                time.perf_counter() - started)
            raise InfeasibleBudgetError(budget, fallback.budget, lower, searched=searched)
        # The least-peak search stops at the first schedule that fits, whatever its
        # time; the exchange search makes it a better hint for the exact back end.
        exchange_until = time.perf_counter() + min(
            EXCHANGE_SHARE * time_limit, FALLBACK_EXCHANGE * _left(deadline))
        found = exchange(problem, Candidate.of(fallback), budget, exchange_until)
        if found.overhead < fallback.predicted_overhead:
            fallback = _from_candidate(problem, found, budget, "heuristic", 0.0)
    # The solver's own bound is weak on large graphs (CP-SAT's relaxation of a
    # cumulative constraint); the interval relaxation's and the knapsack's are
    # valid too and usually far stronger, and no schedule beats the fastest
    # variants kept whole. Rounding to integer nanoseconds can lift a bound a
    # hair above the true optimum; it never exceeds the best schedule found.
    bound = max(time_lower_bound(problem, budget), relaxation_bound, floor)
    remaining = _left(deadline)
    if remaining < MIN_EXACT_SECONDS:
        bound = max(bound, _proven(background, deadline))
        return replace(fallback, budget=budget, status="heuristic", floor=floor,
                       bound=min(bound, fallback.predicted_overhead),
                       solve_seconds=time.perf_counter() - started)
    solution = exact(
        problem, budget, remaining, hint=(fallback.kept, fallback.recompute, fallback.variants),
        log_callback=progress,
    )
    bound = max(bound, _proven(background, deadline))
    seconds = time.perf_counter() - started
    if solution.bound is not None:
        bound = max(bound, solution.bound)
    bound = min(bound, fallback.predicted_overhead)
    if solution.status not in ("optimal", "feasible"):
        return replace(fallback, budget=budget, status="heuristic", bound=bound, floor=floor,
                       solve_seconds=seconds)
    schedule = _finish(
        problem, solution.kept, solution.recompute, budget, solution.status, backend,
        bound, seconds, solution.variants,
    )
    schedule = replace(schedule, bound=min(bound, schedule.predicted_overhead), floor=floor)
    if schedule.predicted_peak > budget:
        raise AssertionError(
            f"the solver's model admitted a schedule whose simulated peak "
            f"{schedule.predicted_peak} exceeds the budget {budget}: a bug in ilp.py"
        )
    if fallback.predicted_overhead < schedule.predicted_overhead:
        # CP-SAT stopped before matching its start point (hints are not binding), or
        # proved an optimum the start beats by its rounding to whole nanoseconds.
        proven = solution.status == "optimal" or bound >= fallback.predicted_overhead
        return replace(fallback, budget=budget, status="optimal" if proven else "feasible",
                       bound=fallback.predicted_overhead if proven else bound, floor=floor,
                       solve_seconds=seconds)
    return schedule


def _proven(background: BackgroundBound, deadline: float) -> float:
    """The child process's bound, waited for until its own time limit (a little past:
    HiGHS overruns it by tenths of a second) but not past ``deadline``; ``-inf`` when
    there is none. Its ``inf`` (nothing fits the relaxation) is left to the other
    bounds: where the program's peaks are not the simulator's it proves nothing."""
    proven = background.result(min(background.deadline + 0.5, deadline) - time.perf_counter())
    return proven if math.isfinite(proven) else -math.inf


def _fit(problem: Problem, start: Candidate | None, budget: int,
         deadline: float) -> Candidate | None:
    """``start`` brought within ``budget`` on the simulator (None: not in time): the
    greedy descent on the peak for half the time, then the repair, which also trims
    what the budget does without. Where they stall with ``start``'s variants, one
    choice at the peak runs a leaner alternative (:func:`leaner_at_peak`) and they go
    on from there."""
    while start is not None:
        halfway = time.perf_counter() + 0.5 * max(0.0, deadline - time.perf_counter())
        stalled: list[Candidate] = []

        def fit(applied: Problem, plain: Candidate) -> Candidate | None:
            lowered = lower_peak(applied, plain, halfway, stop_at=budget)
            stalled.append(lowered)
            return fit_and_trim(applied, lowered, budget, max(deadline, time.perf_counter() + 0.1))

        found = _on_applied(problem, start, fit)
        if found is not None or not problem.choices or time.perf_counter() >= deadline:
            return found
        variants = start.variants or problem.default_variants()
        lowered = replace(stalled[0], variants=variants,
                          overhead=stalled[0].overhead + variant_seconds(problem, variants))
        start = leaner_at_peak(problem, lowered, deadline)
    return None


def _on_applied(
    problem: Problem, start: Candidate,
    work: Callable[[Problem, Candidate], Candidate | None],
) -> Candidate | None:
    """``work(applied, plain)`` on ``problem`` with ``start``'s variants applied, ``plain``
    being ``start`` without them (nor their seconds); its answer comes back with both."""
    variants = start.variants or problem.default_variants()
    extra = variant_seconds(problem, variants)
    found = work(problem.apply(variants),
                 replace(start, variants=(), overhead=start.overhead - extra))
    if found is None:
        return None
    return replace(found, variants=variants, overhead=found.overhead + extra)
