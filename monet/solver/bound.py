"""A cheap, valid lower bound on the recomputation time any schedule needs.

At a point ``p`` of the step, keeping everything puts ``M(p)`` bytes live. Any
other schedule has the same fixed part there, and every storage that
keep-everything holds at ``p`` is either kept (live at least as long) or its
op is recomputed; so its memory at ``p`` is at least ``M(p) − Σ_a b_a(p)·x_a``
over the recomputed ops ``a``, where ``b_a(p)`` is the bytes of ``a``'s outputs
that keep-everything holds at ``p``. Fitting ``budget`` therefore needs
``Σ_a b_a(p)·x_a ≥ M(p) − budget`` at every ``p``, and the cheapest such
``x`` (a fractional knapsack per point; the largest over points) bounds the
added time from below. The same inequality with every op recomputed bounds
the smallest feasible budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from monet.solver.ilp import (
    Structure,
    analyse,
    dropped_storages,
    runs_in_every_forward,
    touched_nodes,
)
from monet.solver.problem import Problem, alternative_nodes
from monet.solver.program import storage_owner


def relaxed(problem: Problem) -> tuple[Problem, float]:
    """A problem without choices that no variant beats, and the least seconds variants add.

    Each overridden node reads only what all its alternatives read, with the
    least time and workspace among them, and a storage any alternative drops holds
    nothing: every keep-everything profile of the
    real problem lies above this one's, and every recomputation costs at least
    as much, so the bounds below stay valid over all variants.
    """
    if not problem.choices:
        return problem, 0.0
    nodes = list(problem.nodes)
    least_delta = 0.0
    for choice in problem.choices:
        per_alternative = alternative_nodes(problem, choice)
        least_delta += min(
            sum(o.time - problem.nodes[i].time for i, o in effective.items())
            for effective in per_alternative
        )
        for i in per_alternative[0]:
            options = [effective[i] for effective in per_alternative]
            common = set.intersection(*(set(o.inputs) for o in options))
            nodes[i] = replace(
                nodes[i],
                inputs=tuple(j for j in nodes[i].inputs if j in common)
                + tuple(sorted(common - set(nodes[i].inputs))),
                time=min(o.time for o in options),
                workspace=min(o.workspace for o in options),
            )
    # A storage some alternative leaves empty may hold nothing.
    sizes = list(problem.storage_bytes)
    for choice in problem.choices:
        for alternative in choice.alternatives:
            for s in alternative.drops:
                sizes[s] = 0
    return (replace(problem, nodes=tuple(nodes), storage_bytes=tuple(sizes), choices=()),
            least_delta)


def deferrable_bytes(problem: Problem, st: Structure, live: set[int] | None = None):
    """Bytes the fixed profile counts in the forward that a schedule may leave out there.

    The forward runs what its outputs and the saved values need. A node the
    outputs do not need (a value only the backward reads: a saved transpose,
    dead code) may be recomputed instead, and then neither its own bytes nor its
    reads of earlier values (which keep those alive past their last needed
    reader) happen in the forward. A lower bound leaves all of that out.
    """
    nodes, sizes = problem.nodes, problem.storage_bytes
    live = runs_in_every_forward(problem, st.forward) if live is None else live
    f_pos = {node: p for p, node in enumerate(st.forward)}
    owner = storage_owner(problem)
    dropped = dropped_storages(problem)  # conditional terms, never fixed bytes
    touched = touched_nodes(problem)
    skipped = np.zeros(st.points + 1, dtype=np.int64)

    def leave_out(start: int, stop: int, amount: int) -> None:
        if start <= stop:
            skipped[start] += amount
            skipped[stop + 1] -= amount

    needed_until: dict[int, int] = {}
    for i in st.forward:
        if i not in live:
            # A touched node's workspace is a conditional term instead, and a node the
            # forward runs only for kept values has optional terms, not fixed ones.
            if i not in touched and i not in st.conditional:
                leave_out(f_pos[i], f_pos[i], nodes[i].workspace)
            continue
        for k in nodes[i].inputs:
            for s in nodes[k].storages:
                needed_until[s] = max(needed_until.get(s, -1), f_pos[i])
    for s in st.decision_storages:
        if s in dropped:
            continue
        a = owner[s]
        if a in st.conditional:
            continue
        if a not in live:
            leave_out(f_pos[a], st.forward_death[s], sizes[s])
        else:
            leave_out(max(f_pos[a], needed_until.get(s, -1)) + 1, st.forward_death[s], sizes[s])
    return np.cumsum(skipped)[: st.points]


def _keep_all_profile(
    problem: Problem, structure: Structure
) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Memory at every point when everything read is kept, and each kept interval
    (less what a schedule may leave out of the forward: :func:`deferrable_bytes`)."""
    n_forward = len(structure.forward)
    delta = [0] * (structure.points + 1)
    spans: dict[int, tuple[int, int]] = {}
    for s in structure.decision_storages:
        if s not in structure.first_read:
            continue
        start = structure.forward_death[s] + 1
        stop = n_forward + 2 * structure.last_read[s] + 1
        spans[s] = (start, stop)
        delta[start] += problem.storage_bytes[s]
        delta[stop + 1] -= problem.storage_bytes[s]
    deferrable = deferrable_bytes(problem, structure)
    level, running = [], 0
    for p in range(structure.points):
        running += delta[p]
        level.append(structure.fixed[p] + running - int(deferrable[p]))
    return level, spans


def time_lower_bound(problem: Problem, budget: int, points: int = 32) -> float:
    """Seconds of recomputation every schedule within ``budget`` needs at least
    (``inf`` when none can fit)."""
    problem, least_delta = relaxed(problem)
    return least_delta + _time_lower_bound(problem, budget, points)


def _time_lower_bound(problem: Problem, budget: int, points: int) -> float:
    structure = analyse(problem)
    level, spans = _keep_all_profile(problem, structure)
    owner = storage_owner(problem)
    worst = sorted(range(len(level)), key=lambda p: level[p], reverse=True)[:points]
    bound = 0.0
    for p in worst:
        excess = level[p] - budget
        if excess <= 0:
            break
        freed: dict[int, int] = {}
        for s, (start, stop) in spans.items():
            if start <= p <= stop and owner[s] in structure.recomputable:
                freed[owner[s]] = freed.get(owner[s], 0) + problem.storage_bytes[s]
        cost = 0.0
        for a in sorted(freed, key=lambda a: structure.cost[a] / freed[a]):
            take = min(1.0, excess / freed[a])
            cost += take * structure.cost[a]
            excess -= take * freed[a]
            if excess <= 0:
                break
        if excess > 0:
            return math.inf
        bound = max(bound, cost)
    return bound


def budget_lower_bound(problem: Problem) -> int:
    """Bytes below which no schedule can fit, whatever it recomputes."""
    problem, _ = relaxed(problem)
    structure = analyse(problem)
    level, spans = _keep_all_profile(problem, structure)
    owner = storage_owner(problem)
    delta = [0] * (len(level) + 1)
    for s, (start, stop) in spans.items():
        if owner[s] in structure.recomputable:
            delta[start] += problem.storage_bytes[s]
            delta[stop + 1] -= problem.storage_bytes[s]
    floor, reducible = 0, 0
    for p, memory in enumerate(level):
        reducible += delta[p]
        floor = max(floor, memory - reducible)
    return floor
