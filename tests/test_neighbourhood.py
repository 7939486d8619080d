"""CP-SAT held to the schedules near a known one, against brute force."""

from __future__ import annotations

import time

import pytest
from test_solver import brute_force

from monet.solver import _finish, keep_all, minimum_budget
from monet.solver.heuristic import Candidate, variant_seconds
from monet.solver.ilp import analyse, solve_cpsat
from monet.solver.neighbourhood import KINDS, improve, neighbourhood
from monet.solver.random_graphs import random_problem, with_random_choices


def _problem_and_start(seed: int):
    """A random problem with choices, a budget a quarter of the way from its least
    peak to keep-all's, and the least-peak schedule as the start (seldom optimal)."""
    problem = with_random_choices(random_problem(5, seed=seed, workspace_probability=0.3),
                                  seed=seed)
    high = keep_all(problem).predicted_peak
    least = minimum_budget(problem, time_limit=5)[0]
    start = Candidate(least.kept, least.recompute, least.predicted_peak,
                      least.predicted_overhead, least.variants)
    return problem, (3 * least.budget + high) // 4, start


@pytest.mark.parametrize("seed", range(4))
def test_each_neighbourhood_holds_what_it_says_and_solves_it_exactly(seed):
    problem, budget, start = _problem_and_start(seed)
    redo = {a for a, _ in start.recompute}
    exact = analyse(problem).exact
    for kind in KINDS:
        found = solve_cpsat(problem, budget, 5, hint=start.hint,
                            within=neighbourhood(kind, start))
        # A model that counts some bytes at their worst (``Structure.exact``) proves
        # optimality for its own schedules only, and says "feasible".
        assert found.status == ("optimal" if exact else "feasible"), kind
        assert found.objective <= start.overhead + 1e-9, kind
        answer = {a for a, _ in found.recompute}
        if kind == "add":
            assert redo <= answer
        elif kind == "drop":
            assert answer <= redo
        else:
            assert found.variants == start.variants
            # With the variants held, the neighbourhood is the plain problem they make.
            expected = brute_force(problem.apply(start.variants), budget)
            expected += variant_seconds(problem, start.variants)
            if exact:
                assert found.objective == pytest.approx(expected, abs=1e-8)
            else:
                assert found.objective >= expected - 1e-8


@pytest.mark.parametrize("seed", range(4))
def test_improve_returns_a_fitting_schedule_no_dearer_than_its_start(seed):
    problem, budget, start = _problem_and_start(seed)
    found = improve(problem, start, budget, time.perf_counter() + 10, kinds=KINDS)
    assert found.peak <= budget
    assert found.overhead <= start.overhead + 1e-12
    assert len(found.variants) == len(problem.choices)
    # What it says of the schedule is the simulator's.
    schedule = _finish(problem, found.kept, found.recompute, budget, "feasible", "cpsat",
                       variants=found.variants)
    assert (schedule.predicted_peak, schedule.predicted_overhead) == (
        found.peak, pytest.approx(found.overhead, abs=1e-12))


def test_an_unknown_neighbourhood_is_refused():
    with pytest.raises(ValueError, match="unknown neighbourhood 'nearby'"):
        neighbourhood("nearby", Candidate((), (), 0, 0.0, ()))
