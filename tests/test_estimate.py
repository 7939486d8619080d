"""The model's peak (the heuristics' fast filter) and the exchange search built on it."""

from __future__ import annotations

import random
import time

import pytest

from monet.simulate import simulate
from monet.solver import Schedule, build_program, keep_all, minimum_budget
from monet.solver.estimate import PeakModel
from monet.solver.heuristic import (
    estimate,
    evaluate,
    exchange,
    ranking,
    recompute_seconds,
    scan,
    variant_seconds,
)
from monet.solver.ilp import analyse
from monet.solver.random_graphs import random_problem


def added_seconds(problem, candidate) -> float:
    """What ``solve`` reports for ``candidate``: its recomputations and variants."""
    variants = candidate.variants or problem.default_variants()
    draft = Schedule(problem.graph_hash, None, candidate.kept, candidate.recompute, 0, 0.0,
                     "heuristic", variants=variants)
    structure = analyse(problem.apply(variants))
    return (recompute_seconds(structure, build_program(problem, draft), candidate.recompute)
            + variant_seconds(problem, variants))


def simulated_peak(problem, candidate) -> int:
    draft = Schedule(problem.graph_hash, None, candidate.kept, candidate.recompute, 0, 0.0,
                     "heuristic")
    return simulate(problem, build_program(problem, draft)).peak


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_the_model_peak_is_never_below_the_simulated_one(seed):
    problem = random_problem(150, seed=seed, workspace_probability=0.4)
    structure = analyse(problem)
    model = PeakModel(problem, structure)
    rng = random.Random(seed)
    ops = sorted(structure.recomputable)
    redos = [set(), set(ops)] + [set(rng.sample(ops, rng.randint(1, len(ops))))
                                 for _ in range(40)]
    redos += [{a for a, _ in c.recompute} for c in scan(problem, evaluations=12)]
    equal = 0
    for redo in redos:
        guess = estimate(problem, structure, model, redo)
        if guess is None:
            assert evaluate(problem, structure, redo) is None
            continue
        exact = simulated_peak(problem, guess)
        assert guess.peak >= exact
        equal += guess.peak == exact
        # What the model says is live at its peak adds up with the fixed bytes.
        peak, point, live = model.at_peak(guess.kept, guess.recompute)
        assert peak == guess.peak
        assert structure.fixed[point] + sum(problem.storage_bytes[s] for s in live) <= peak
    if structure.exact:
        # Keeping everything recomputes nothing: the model is the simulator there.
        keep = estimate(problem, structure, model, set())
        assert keep.peak == simulated_peak(problem, keep) == keep_all(problem).predicted_peak
    assert equal >= len(redos) // 4


def test_the_model_refuses_a_problem_with_choices_left():
    from monet.solver.random_graphs import with_random_choices

    problem = with_random_choices(random_problem(60, seed=1), seed=1)
    with pytest.raises(ValueError, match="apply the variants"):
        PeakModel(problem, analyse(problem))


@pytest.mark.parametrize("seed", [2, 5])
def test_exchange_trades_recomputations_within_the_budget(seed):
    problem = random_problem(200, seed=seed, workspace_probability=0.3)
    structure = analyse(problem)
    high = keep_all(problem).predicted_peak
    low = minimum_budget(problem, time_limit=2, coarsen_first=False)[0].budget
    budget = (high + low) // 2
    # Recomputing every op worth it fits and wastes time: a start to improve on.
    start = evaluate(problem, structure, set(ranking(problem, structure)))
    assert start is not None and start.peak <= budget
    found = exchange(problem, start, budget, time.perf_counter() + 10)
    assert found.peak <= budget
    assert found.peak == simulated_peak(problem, found)
    assert found.overhead < start.overhead
    assert found.overhead == pytest.approx(added_seconds(problem, found))
    # Out of time, it returns its start.
    assert exchange(problem, start, budget, time.perf_counter() - 1) == start


@pytest.mark.parametrize("seed", [2, 6])
def test_exchange_also_switches_operator_variants(seed):
    from monet.solver.heuristic import Candidate, fastest_variants
    from monet.solver.random_graphs import with_random_choices

    problem = with_random_choices(random_problem(200, seed=seed, workspace_probability=0.3),
                                  seed=seed, count=20)
    fastest = fastest_variants(problem)
    applied = problem.apply(fastest)
    structure = analyse(applied)
    # A fixed fraction of the keep-everything peak: a budget from a time-limited
    # minimum_budget moved with the machine's speed, and with it the outcome.
    budget = 65 * keep_all(problem, fastest).predicted_peak // 100
    plain = evaluate(applied, structure, set(ranking(applied, structure)))
    assert plain.peak <= budget
    start = Candidate(plain.kept, plain.recompute, plain.peak,
                      plain.overhead + variant_seconds(problem, fastest), fastest)
    found = exchange(problem, start, budget, time.perf_counter() + 20)
    assert found.variants != fastest
    assert found.overhead < start.overhead
    draft = Schedule(problem.graph_hash, budget, found.kept, found.recompute, 0, 0.0,
                     "heuristic", variants=found.variants)
    assert simulate(problem, build_program(problem, draft)).peak == found.peak <= budget
    assert found.overhead == pytest.approx(added_seconds(problem, found))


@pytest.mark.parametrize("seed", [1, 4])
def test_exchange_tries_a_kernel_that_needs_less_workspace_at_the_peak(seed, monkeypatch):
    """A backward node at the peak gets an alternative that reads the same values, runs a
    little slower and needs no workspace (a convolution's native kernel): it holds no
    fewer bytes, so only its workspace can make room, and the search that tries it
    drops recomputations instead of paying for them."""
    from dataclasses import replace

    from monet.solver import heuristic
    from monet.solver.heuristic import Candidate
    from monet.solver.problem import Alternative, Choice, Override

    plain = random_problem(60, seed=seed)
    profile = simulate(plain, build_program(plain, keep_all(plain)))
    at_peak = next(i for i, n in enumerate(plain.nodes)
                   if n.name == profile.peak_node and n.phase == "backward")
    extra = profile.peak // 4
    nodes = list(plain.nodes)
    node = nodes[at_peak]
    nodes[at_peak] = replace(node, workspace=node.workspace + extra)
    lean = Alternative("lean", (Override(at_peak, node.inputs, node.time * 1.05 + 1e-6, 0),))
    problem = replace(plain, nodes=tuple(nodes),
                      choices=(Choice(node.name, (Alternative("default"), lean)),))
    budget = profile.peak + extra // 2  # the lean kernel fits with everything kept
    default = problem.default_variants()
    applied = problem.apply(default)
    structure = analyse(applied)
    fitting = evaluate(applied, structure, set(ranking(applied, structure)))
    assert fitting is not None and fitting.peak <= budget
    start = Candidate(fitting.kept, fitting.recompute, fitting.peak, fitting.overhead, default)
    assert start.overhead > lean.overrides[0].time - node.time

    found = exchange(problem, start, budget, time.perf_counter() + 10)
    assert found.variants == (1,)
    assert found.overhead < start.overhead
    draft = Schedule(problem.graph_hash, budget, found.kept, found.recompute, 0, 0.0,
                     "heuristic", variants=found.variants)
    assert simulate(problem, build_program(problem, draft)).peak == found.peak <= budget
    assert found.overhead == pytest.approx(added_seconds(problem, found))
    # Ranked with the variants that hold fewer bytes, it is never tried.
    monkeypatch.setattr(heuristic, "WORKSPACE_SWITCHES", 0)
    assert exchange(problem, start, budget, time.perf_counter() + 10).variants == default
