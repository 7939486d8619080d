"""The memory model: the exact peak of live storages over an executed step.

One function, :func:`simulate`, computes the peak; the solver reports it for
its schedules, the tests compare the lowered graphs against it, and
``measure.py`` checks it against the device. Counting is by storage: a value
keeps every storage it references alive (a view its base's), a storage is
freed when the last value referencing it dies, and a value dies right after
its last reader in the executed order. Inputs, tangents and outputs live for
the whole step. The running op's workspace is added to the live bytes while
it runs.

This module imports no torch at module level, so the solver can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from monet.solver.problem import Problem
from monet.solver.program import RELEASE, Program, Step, Value, tables


@dataclass(frozen=True)
class Crowded:
    """One executed step above a byte threshold."""

    phase: str
    index: int
    """Position of the step in its phase's program."""
    live: tuple[tuple[int, int], ...]
    """(storage, copy) instances live while it runs."""


@dataclass(frozen=True)
class Simulation:
    peak: int
    """Peak bytes of the whole step (inputs and parameters included)."""
    peak_phase: str
    peak_node: str
    """Name of the node running at the peak (``release`` for a release step)."""
    timeline: tuple[tuple[str, str, int], ...]
    """(phase, node name, live bytes while it ran) for every executed step."""
    live_at_peak: tuple[tuple[int, int], ...] = ()
    """(storage, copy) instances live at the peak: copy 1 is a recomputed one."""
    crowded: tuple[Crowded, ...] = ()
    """The steps whose live bytes exceed ``simulate``'s ``over``, with what is live there."""


class _Memory:
    def __init__(self, sizes: tuple[int, ...]):
        self.sizes = sizes
        self.refs: dict[tuple[int, int], int] = {}
        self.values: dict[Value, tuple[tuple[int, int], ...]] = {}
        self.live = 0

    def add_value(self, value: Value, instances: tuple[tuple[int, int], ...]) -> None:
        if value in self.values:
            raise AssertionError(f"value {value} defined twice")
        self.values[value] = instances
        for instance in instances:
            count = self.refs.get(instance, 0)
            if count == 0:
                self.live += self.sizes[instance[0]]
            self.refs[instance] = count + 1

    def drop_value(self, value: Value) -> None:
        for instance in self.values.pop(value):
            self.refs[instance] -= 1
            if self.refs[instance] == 0:
                del self.refs[instance]
                self.live -= self.sizes[instance[0]]


def simulate(problem: Problem, program: Program, over: int | None = None) -> Simulation:
    """Peak live bytes of ``program`` executed on ``problem``'s storages; with ``over``,
    also every step above that many bytes and what is live there."""
    problem = problem.apply(program.variants)
    nodes, sizes = problem.nodes, problem.storage_bytes
    memory = _Memory(sizes)
    timeline: list[tuple[str, str, int]] = []
    best = (-1, "", "")
    live_at_peak: tuple[tuple[int, int], ...] = ()
    crowded: list[Crowded] = []

    def record(phase: str, name: str, workspace: int, index: int) -> None:
        nonlocal best, live_at_peak
        level = memory.live + workspace
        timeline.append((phase, name, level))
        if over is not None and level > over:
            crowded.append(Crowded(phase, index, tuple(memory.refs)))
        if level > best[0]:
            best = (level, phase, name)
            live_at_peak = tuple(memory.refs)

    layout = tables(problem).layout

    def instances_of(step: Step, copy: int) -> tuple[tuple[int, int], ...]:
        result = []
        for s, allocated in layout[step.node]:
            if allocated:
                result.append((s, copy))
                continue
            found = next((i for v in step.reads for i in memory.values.get(v, ()) if i[0] == s),
                         None)
            if found is None:
                name = nodes[step.node].name
                raise AssertionError(f"{name} aliases storage {s} that none of its inputs holds")
            result.append(found)
        return tuple(result)

    def run(phase: str, steps: tuple[Step, ...], pinned: set[Value]) -> None:
        last_read: dict[Value, int] = {}
        for index, step in enumerate(steps):
            for v in step.reads:
                last_read[v] = index
        for index, step in enumerate(steps):
            for v in step.reads:
                if v not in memory.values:
                    name = "release" if step.node == RELEASE else nodes[step.node].name
                    raise AssertionError(f"{phase} step {name} reads {v}, which is not live")
            if step.node == RELEASE:
                record(phase, "release", 0, index)
            else:
                copy = 1 if step.recompute else 0
                value = (step.node, copy)
                memory.add_value(value, instances_of(step, copy))
                record(phase, nodes[step.node].name, nodes[step.node].workspace, index)
                if value not in pinned and last_read.get(value, -1) <= index:
                    memory.drop_value(value)
            for v in set(step.reads):
                if v not in pinned and last_read[v] == index and v in memory.values:
                    memory.drop_value(v)

    inputs = [(i, 0) for i, n in enumerate(nodes) if n.phase == "input"]
    for i, _ in inputs:
        memory.add_value((i, 0), tuple((s, 0) for s in nodes[i].allocates))
    outputs = {(i, 0) for i, n in enumerate(nodes) if n.is_output}
    forward_pinned = set(inputs) | outputs | {(i, 0) for i in program.saved}
    run("forward", program.forward, forward_pinned)
    leaked = set(memory.values) - forward_pinned
    if leaked:
        raise AssertionError(f"values live after the forward but not handed on: {sorted(leaked)}")
    tangents = [(i, 0) for i, n in enumerate(nodes) if n.phase == "tangent"]
    for i, _ in tangents:
        memory.add_value((i, 0), tuple((s, 0) for s in nodes[i].allocates))
    backward_pinned = set(inputs) | set(tangents) | outputs
    run("backward", program.backward, backward_pinned)
    return Simulation(best[0], best[1], best[2], tuple(timeline), live_at_peak, tuple(crowded))


def program_of_graphs(problem: Problem, names: dict[str, int], forward_graph, backward_graph,
                      num_forward_outputs: int, variants: tuple[int, ...] = ()) -> Program:
    """Read the executed program back from lowered fx graphs (an independent check of lowering).

    ``names`` maps a joint-graph node name to its problem index.
    """
    from monet.lower import release

    nodes = problem.nodes
    forward_steps = []
    for n in forward_graph.nodes:
        if n.op == "call_function":
            i = names[n.name]
            forward_steps.append(Step(i, False, tuple((names[m.name], 0) for m in n.all_input_nodes)))
    outputs = forward_graph.output_node().args[0]
    saved = tuple(
        sorted(
            names[m.name] for m in outputs[num_forward_outputs:]
            if nodes[names[m.name]].phase == "forward"
        )
    )
    backward_steps = []

    def value(m) -> Value:
        i = names[m.name]
        recomputed = m.op == "call_function" and nodes[i].phase == "forward"
        return (i, 1 if recomputed else 0)

    for n in backward_graph.nodes:
        if n.op != "call_function":
            continue
        reads = tuple(value(m) for m in n.all_input_nodes)
        if n.target is release:
            backward_steps.append(Step(RELEASE, False, reads))
        else:
            i = names[n.name]
            backward_steps.append(Step(i, nodes[i].phase == "forward", reads))
    return Program(tuple(forward_steps), tuple(backward_steps), saved, tuple(variants))
