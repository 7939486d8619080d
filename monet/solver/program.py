"""A schedule turned into the exact sequence of steps the runtime will execute.

The forward runs the forward nodes in order. The backward runs, for each
backward node ``j``: the recomputations scheduled in slot ``j`` (in forward
order), then a *release* step that holds every value whose last reader was in
that slot (so they die together, as the solver's model says), then node ``j``.
``lower.py`` materialises exactly this sequence as fx graphs, and
``simulate.py`` computes its peak; the solver reports that peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from monet.solver.problem import Problem
from monet.solver.schedule import Schedule

RELEASE = -1

Value = tuple[int, int]
"""(node index, copy): copy 0 is the forward value, 1 the recomputed one."""


class Step(NamedTuple):
    # A tuple rather than a dataclass: programs of the zoo's graphs hold
    # thousands of steps and the heuristics build hundreds of programs.
    node: int
    """Problem node index, or ``RELEASE``."""
    recompute: bool
    reads: tuple[Value, ...]


@dataclass(frozen=True)
class Program:
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    saved: tuple[int, ...]
    """Forward nodes whose values are handed from the forward to the backward."""
    variants: tuple[int, ...] = ()
    """The alternative each of the problem's choices runs."""


class ScheduleError(ValueError):
    """A schedule that cannot be executed (a value needed but neither kept nor recomputed)."""


def pinned_storages(problem: Problem) -> set[int]:
    """Storages alive for the whole step whatever the schedule: inputs, tangents, outputs."""
    pinned: set[int] = set()
    for n in problem.nodes:
        if n.phase in ("input", "tangent") or (n.phase == "forward" and n.is_output):
            pinned.update(n.storages)
    return pinned


def storage_owner(problem: Problem) -> dict[int, int]:
    """Storage index → index of the node that allocates it (cached on the problem)."""
    return problem.storage_owner()


def node_owner(problem: Problem, pinned: set[int], owner: dict[int, int]) -> dict[int, int]:
    """Forward node → the op owning its non-pinned storages (absent: all pinned)."""
    result: dict[int, int] = {}
    for i, n in enumerate(problem.nodes):
        if n.phase != "forward":
            continue
        owners = {owner[s] for s in n.storages if s not in pinned}
        if len(owners) > 1:
            raise ScheduleError(f"node {n.name} references storages of several ops: {owners}")
        if owners:
            result[i] = owners.pop()
    return result


@dataclass(frozen=True)
class Tables:
    """What every program of one problem shares, derived once (see :func:`tables`)."""

    forward: tuple[int, ...]
    backward: tuple[int, ...]
    owner_of: dict[int, int]
    unpinned: tuple[tuple[int, ...], ...]
    """Per node, the storages it references that are not pinned."""
    forward_inputs: tuple[tuple[int, ...], ...]
    """Per node, the forward nodes among its inputs."""
    layout: tuple[tuple[tuple[int, bool], ...], ...]
    """Per node, its storages in order, each with whether the node allocates it."""


def tables(problem: Problem) -> Tables:
    """The problem's :class:`Tables`, cached on it (a problem never changes)."""
    cached = problem.__dict__.get("_program_tables")
    if cached is None:
        nodes = problem.nodes
        pinned = pinned_storages(problem)
        is_forward = [n.phase == "forward" for n in nodes]
        cached = Tables(
            tuple(i for i, n in enumerate(nodes) if n.phase == "forward"),
            tuple(i for i, n in enumerate(nodes) if n.phase == "backward"),
            node_owner(problem, pinned, storage_owner(problem)),
            tuple(tuple(s for s in n.storages if s not in pinned) for n in nodes),
            tuple(tuple(k for k in n.inputs if is_forward[k]) for n in nodes),
            tuple(tuple((s, s in n.allocates) for s in n.storages) for n in nodes),
        )
        problem.__dict__["_program_tables"] = cached
    return cached


def build_program(problem: Problem, schedule: Schedule) -> Program:
    """The executed step sequence of ``schedule`` on ``problem``."""
    problem = problem.apply(schedule.variants)
    nodes = problem.nodes
    derived = tables(problem)
    owner_of, unpinned, forward_inputs = derived.owner_of, derived.unpinned, derived.forward_inputs
    kept = set(schedule.kept)
    slot_of_op = dict(schedule.recompute)

    # Recomputed nodes and the slot each runs in; saved nodes the backward reads.
    recompute_slot: dict[int, int] = {}
    saved: set[int] = set()

    def require(i: int, slot: int, reader: str) -> None:
        if i in saved:
            return
        if all(s in kept for s in unpinned[i]):
            saved.add(i)
            return
        op = owner_of.get(i)
        if op is None or op not in slot_of_op:
            raise ScheduleError(
                f"{nodes[i].name} is needed by {reader} but is neither kept nor recomputed"
            )
        op_slot = slot_of_op[op]
        if op_slot > slot:
            raise ScheduleError(
                f"{nodes[i].name} is recomputed in slot {op_slot}, after {reader} needs it "
                f"(slot {slot})"
            )
        if i in recompute_slot:
            return
        recompute_slot[i] = op_slot
        for j in forward_inputs[i]:
            require(j, op_slot, f"the recomputation of {nodes[i].name}")

    backward = derived.backward
    for j, i in enumerate(backward):
        for k in forward_inputs[i]:
            require(k, j, nodes[i].name)

    # The forward runs what its outputs and the saved values need, in order.
    executed: set[int] = set()
    stack = [i for i in derived.forward if nodes[i].is_output] + sorted(saved)
    while stack:
        i = stack.pop()
        if i in executed or nodes[i].phase != "forward":
            continue
        executed.add(i)
        stack.extend(nodes[i].inputs)
    forward_steps = tuple(
        Step(i, False, tuple((k, 0) for k in nodes[i].inputs))
        for i in derived.forward
        if i in executed
    )

    def backward_reads(i: int) -> tuple[Value, ...]:
        return tuple((k, 1) if k in recompute_slot else (k, 0) for k in nodes[i].inputs)

    by_slot: dict[int, list[int]] = {}
    for i in sorted(recompute_slot):
        by_slot.setdefault(recompute_slot[i], []).append(i)
    groups: list[tuple[list[Step], Step]] = []
    for j, i in enumerate(backward):
        recomputes = [Step(r, True, backward_reads(r)) for r in by_slot.get(j, ())]
        groups.append((recomputes, Step(i, False, backward_reads(i))))
    # The group of each value's last reader, to place the releases.
    last_group: dict[Value, int] = {}
    last_in_recompute: dict[Value, bool] = {}
    for g, (recomputes, main) in enumerate(groups):
        for step in recomputes:
            for v in step.reads:
                last_group[v], last_in_recompute[v] = g, True
        for v in main.reads:
            last_group[v], last_in_recompute[v] = g, False
    releases: dict[int, list[Value]] = {}
    for v, g in last_group.items():
        if last_in_recompute[v]:
            releases.setdefault(g, []).append(v)
    backward_steps: list[Step] = []
    for g, (recomputes, main) in enumerate(groups):
        backward_steps.extend(recomputes)
        if g in releases:
            backward_steps.append(Step(RELEASE, False, tuple(sorted(releases[g]))))
        backward_steps.append(main)
    return Program(
        forward_steps, tuple(backward_steps), tuple(sorted(saved)), tuple(schedule.variants)
    )
