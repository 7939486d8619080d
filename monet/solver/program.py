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

from monet.solver.problem import Problem
from monet.solver.schedule import Schedule

RELEASE = -1

Value = tuple[int, int]
"""(node index, copy): copy 0 is the forward value, 1 the recomputed one."""


@dataclass(frozen=True)
class Step:
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
    """Storage index → index of the node that allocates it."""
    return {s: i for i, n in enumerate(problem.nodes) for s in n.allocates}


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


def build_program(problem: Problem, schedule: Schedule) -> Program:
    """The executed step sequence of ``schedule`` on ``problem``."""
    problem = problem.apply(schedule.variants)
    nodes = problem.nodes
    pinned = pinned_storages(problem)
    owner_of = node_owner(problem, pinned, storage_owner(problem))
    kept = set(schedule.kept)
    slot_of_op = dict(schedule.recompute)
    forward = [i for i, n in enumerate(nodes) if n.phase == "forward"]
    backward = [i for i, n in enumerate(nodes) if n.phase == "backward"]

    def is_saved(i: int) -> bool:
        return all(s in pinned or s in kept for s in nodes[i].storages)

    # Recomputed nodes and the slot each runs in; saved nodes the backward reads.
    recompute_slot: dict[int, int] = {}
    saved: set[int] = set()

    def require(i: int, slot: int, reader: str) -> None:
        if is_saved(i):
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
        for j in nodes[i].inputs:
            if nodes[j].phase == "forward":
                require(j, op_slot, f"the recomputation of {nodes[i].name}")

    for j, i in enumerate(backward):
        for k in nodes[i].inputs:
            if nodes[k].phase == "forward":
                require(k, j, nodes[i].name)

    def value(i: int, in_backward: bool) -> Value:
        return (i, 1 if in_backward and i in recompute_slot else 0)

    # The forward runs what its outputs and the saved values need, in order.
    executed: set[int] = set()
    stack = [i for i in forward if nodes[i].is_output] + sorted(saved)
    while stack:
        i = stack.pop()
        if i in executed or nodes[i].phase != "forward":
            continue
        executed.add(i)
        stack.extend(nodes[i].inputs)
    forward_steps = tuple(
        Step(i, False, tuple(value(k, False) for k in nodes[i].inputs))
        for i in forward
        if i in executed
    )
    by_slot: dict[int, list[int]] = {}
    for i in sorted(recompute_slot):
        by_slot.setdefault(recompute_slot[i], []).append(i)
    groups: list[tuple[list[Step], Step]] = []
    for j, i in enumerate(backward):
        recomputes = [
            Step(r, True, tuple(value(k, True) for k in nodes[r].inputs))
            for r in by_slot.get(j, ())
        ]
        main = Step(i, False, tuple(value(k, True) for k in nodes[i].inputs))
        groups.append((recomputes, main))
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
