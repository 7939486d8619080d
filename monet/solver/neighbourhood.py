"""Large-neighbourhood search: CP-SAT on the schedules near a known one.

The whole program, hinted with a good schedule, often cannot improve on it in a
second or two on the zoo's graphs (ConvNeXt-T at 0.5 of keep-all: 88.6 ms added
stays 88.6 after 3 s). Held to a part of the schedules around the hint, it
searches a far smaller space: with every op the hint recomputes still
recomputed and the variants free, it finds 63-68 ms there in 2 s (the
recomputations it adds pay for faster variants elsewhere).

``solve`` ran it before the exchange search until 2026-12-07; on that day's
problems the exchange search given its time did better (``RELAXATION_SHARE``).
It stays a tested tool for the search's next steps (fitting a start over the
budget: the "add" neighbourhood hinted with one finds none or far dearer
answers than ``solve._fit``, 1,008 against 96 ms on ConvNeXt-T at 0.5).
"""

from __future__ import annotations

import time

from monet.solver.heuristic import Candidate
from monet.solver.ilp import Neighbourhood, solve_cpsat
from monet.solver.problem import Problem

KINDS = ("add", "drop", "variants")
"""``add``: every op the schedule recomputes stays recomputed, variants free; ``drop``:
only ops it recomputes may be recomputed, variants free; ``variants``: its variants
held, recomputations free."""


def neighbourhood(kind: str, start: Candidate) -> Neighbourhood:
    redo = frozenset(a for a, _ in start.recompute)
    if kind == "add":
        return Neighbourhood(recomputed=redo)
    if kind == "drop":
        return Neighbourhood(recomputable=redo)
    if kind == "variants":
        return Neighbourhood(variants=dict(enumerate(start.variants)))
    raise ValueError(f"unknown neighbourhood {kind!r}; known: {', '.join(KINDS)}")


def improve(problem: Problem, start: Candidate, budget: int, deadline: float,
            kinds: tuple[str, ...] = ("add",), slice_seconds: float = 1.0) -> Candidate:
    """``start`` (within ``budget``) improved by CP-SAT in the neighbourhoods ``kinds``
    around the best schedule so far, in turn, each for ``slice_seconds`` at most, until
    ``deadline`` (``time.perf_counter()``) or a round of them changes nothing. Every
    answer is simulated; one over the budget or no cheaper is not taken."""
    from monet.solver import _finish

    best = start
    stalled = 0
    turn = 0
    while stalled < len(kinds):
        left = deadline - time.perf_counter()
        if left < 0.3:
            break
        kind = kinds[turn % len(kinds)]
        turn += 1
        found = solve_cpsat(problem, budget, min(slice_seconds, left), hint=best.hint,
                            within=neighbourhood(kind, best))
        stalled += 1
        if found.status not in ("optimal", "feasible") or found.objective >= best.overhead:
            continue
        schedule = _finish(problem, found.kept, found.recompute, budget, found.status,
                           "cpsat", variants=found.variants)
        if schedule.predicted_peak <= budget and schedule.predicted_overhead < best.overhead:
            best = Candidate.of(schedule)
            stalled = 0
    return best
