"""Coarsening: a smaller problem with the same optimum, and the way back.

The solver's size is set by the joint graph's aten nodes, many of which decide
nothing: a view shares its base's storage, a ``getitem`` picks the one output
of an op, the ops that make a random mask are never recomputed. :func:`coarsen`
folds such nodes into a neighbour, giving a :class:`Coarsening`: the coarse
:class:`Problem` and the maps back, so that :meth:`Coarsening.expand` turns a
schedule of the coarse problem into one of the original, re-simulated there
(its ``predicted_peak`` is the original problem's truth).

The folds, each argued against the program (``program.py``) and the simulator
(``simulate.py``), which define the true peak:

* **forward aliases** (exact): a forward node that allocates nothing and
  references exactly the storages of its one input (a view, a reshape, a
  ``getitem`` of a one-output op); its readers read the input instead.
* **chains** (exact, under the conditions of :func:`_fusable`): a forward op
  whose only reader is the next op, when the two together are never worth
  recomputing; the reader absorbs it.
* **backward aliases** (approximate, off by default): the same as forward
  aliases, in the backward.

Every fold keeps :meth:`Coarsening.expand` safe: the expanded schedule costs
what the coarse one does and its simulated peak is at most the coarse one's.
Exact folds also keep the optimum, and never make the solver's model more
conservative, so a coarse bound bounds the original problem too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from monet.simulate import simulate
from monet.solver.bound import time_lower_bound
from monet.solver.heuristic import recompute_seconds, variant_seconds
from monet.solver.ilp import analyse
from monet.solver.problem import Choice, Override, Problem, structure_hash
from monet.solver.program import build_program, pinned_storages
from monet.solver.schedule import Schedule


@dataclass(frozen=True)
class CoarsenOptions:
    """Which folds :func:`coarsen` applies (each can be switched off for debugging)."""

    forward_aliases: bool = True
    """Fold forward views into their base. Exact."""
    chains: bool = True
    """Fuse a forward op into its only reader where that provably loses nothing
    (the fused node is never recomputed: random masks and what feeds them). Exact."""
    backward_aliases: bool = False
    """Fold backward views into their base. Approximate: a recomputation can no longer
    run between a view and the node before it, so two groups of recomputations in
    one gap of the backward can no longer be separated by the release of the
    first group's inputs."""


@dataclass(frozen=True)
class Coarsening:
    """A coarse problem and what each of its nodes, storages and slots stands for."""

    original: Problem
    problem: Problem
    """The coarse problem: solve this one."""
    members: tuple[tuple[int, ...], ...]
    """Coarse node → the original nodes folded into it, in order."""
    storage_origin: tuple[int, ...]
    """Coarse storage → original storage."""
    slot_origin: tuple[int, ...]
    """Coarse backward slot → the original slot its recomputations run in."""
    exact: bool
    """Whether only exact folds were applied (the coarse optimum is the original's)."""
    folds: dict[str, int] = field(default_factory=dict)
    """Nodes removed by each kind of fold."""

    def expand(self, schedule: Schedule) -> Schedule:
        """``schedule`` of the coarse problem as a schedule of the original one.

        Kept storages map to the same storages; a recomputed coarse node
        recomputes every original op folded into it, in the original slot its
        coarse slot stands for. The peak is simulated on the original problem.
        With approximate folds, the coarse bound does not bound the original
        problem: the original's knapsack bound replaces it, and ``optimal``
        becomes ``feasible``.
        """
        if schedule.graph_hash != self.problem.graph_hash:
            raise ValueError("the schedule was not made for this coarse problem")
        original = self.original
        ops = set(analyse(original).ops)
        kept = tuple(sorted(self.storage_origin[s] for s in schedule.kept))
        recompute = tuple(sorted(
            (i, self.slot_origin[slot])
            for node, slot in schedule.recompute
            for i in self.members[node]
            if i in ops
        ))
        variants = tuple(schedule.variants) or original.default_variants()
        draft = Schedule(original.graph_hash, schedule.budget, kept, recompute, 0, 0.0,
                         schedule.status, schedule.backend, variants=variants)
        program = build_program(original, draft)
        peak = simulate(original, program).peak
        overhead = (recompute_seconds(analyse(original.apply(variants)), program, recompute)
                    + variant_seconds(original, variants))
        status, bound = schedule.status, schedule.bound
        if not self.exact:
            status = "feasible" if status == "optimal" else status
            bound = None if schedule.budget is None else time_lower_bound(original,
                                                                          schedule.budget)
        if bound is not None:
            bound = min(max(bound, schedule.floor), overhead)
        meta = {**schedule.meta, "coarsened": self.summary()}
        return replace(draft, predicted_peak=peak, predicted_overhead=overhead, status=status,
                       bound=bound, solve_seconds=schedule.solve_seconds, meta=meta,
                       floor=schedule.floor)

    def summary(self) -> str:
        """Node counts before and after, per phase, and what each fold removed."""
        def count(problem: Problem, phase: str) -> int:
            return sum(n.phase == phase for n in problem.nodes)

        before, after = self.original, self.problem
        folds = ", ".join(f"{kind} {n}" for kind, n in self.folds.items() if n) or "nothing"
        return (
            f"{len(before.nodes)} → {len(after.nodes)} nodes (forward "
            f"{count(before, 'forward')} → {count(after, 'forward')}, backward "
            f"{count(before, 'backward')} → {count(after, 'backward')}); folded: {folds}"
            + ("" if self.exact else "; approximate")
        )


def variant_nodes(problem: Problem) -> set[int]:
    """Nodes an operator variant overrides or reads: coarsening leaves them untouched,
    so that the choices carry over with their indices remapped."""
    touched: set[int] = set()
    dropped: set[int] = set()
    for choice in problem.choices:
        for alternative in choice.alternatives:
            dropped.update(alternative.drops)
            for override in alternative.overrides:
                touched.add(override.node)
                touched.update(override.inputs)
    if dropped:
        # A dropped storage's views and their op's readers stay apart: a fold
        # would make a reader of a kept output read the empty one too.
        owners = {problem.storage_owner()[s] for s in dropped}
        for i, n in enumerate(problem.nodes):
            if dropped & set(n.storages) or owners & set(n.inputs):
                touched.add(i)
    return touched


class _Graph:
    """The problem's nodes as mutable records while folds rewrite them."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.nodes = list(problem.nodes)
        self.alive = [True] * len(self.nodes)
        self.members = [[i] for i in range(len(self.nodes))]
        self.readers: list[dict[int, None]] = [{} for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            for k in n.inputs:
                self.readers[k][i] = None
        self.pinned = pinned_storages(problem)
        self.frozen = variant_nodes(problem)

    def bytes_of(self, storages) -> int:
        return sum(self.problem.storage_bytes[s] for s in storages)

    def alias_of(self, v: int, phases: tuple[str, ...]) -> int | None:
        """The one input whose storages ``v`` merely aliases, when ``v`` may fold into it."""
        n = self.nodes[v]
        if n.allocates or n.workspace or len(n.inputs) != 1 or v in self.frozen:
            return None
        if n.phase == "forward" and not n.recomputable:
            return None  # an in-place op with side effects, not a view
        (x,) = n.inputs
        if x in self.frozen or self.nodes[x].phase not in phases:
            return None
        if set(n.storages) != set(self.nodes[x].storages):
            return None
        return x

    def fold_aliases(self, phase: str, bases: tuple[str, ...]) -> int:
        """Fold every alias of ``phase`` whose input is of a phase in ``bases``; how many."""
        folded = 0
        for v in self.order(phase):
            x = self.alias_of(v, bases)
            if x is not None:
                self.fold_alias(v, x)
                folded += 1
        return folded

    def fold_alias(self, v: int, x: int) -> None:
        """Readers of ``v`` read ``x``, which takes ``v``'s time (same owner: same cost)."""
        node = self.nodes[v]
        for r in self.readers[v]:
            inputs = self.nodes[r].inputs
            self.nodes[r] = replace(
                self.nodes[r], inputs=tuple(dict.fromkeys(x if k == v else k for k in inputs))
            )
            self.readers[x][r] = None
        del self.readers[x][v]
        self.nodes[x] = replace(self.nodes[x], time=self.nodes[x].time + node.time,
                                is_output=self.nodes[x].is_output or node.is_output)
        self._remove(v, x)

    def fuse(self, a: int, b: int) -> None:
        """``b`` runs ``a`` first and is never recomputed; ``a``'s outputs become part of
        ``b``'s workspace.

        Workspace ``max(S_a + w_a - S_b, S_a + w_b)`` puts the fused step at
        exactly ``max`` of the two steps it replaces: ``a``'s (its outputs
        ``S_a`` and workspace ``w_a``), then ``b``'s (``S_a`` still live, ``b``'s
        outputs ``S_b`` and ``w_b``).
        """
        first, second = self.nodes[a], self.nodes[b]
        produced, made = self.bytes_of(first.allocates), self.bytes_of(second.allocates)
        workspace = max(produced + first.workspace - made, produced + second.workspace)
        inputs = tuple(dict.fromkeys(
            [*first.inputs, *(k for k in second.inputs if k != a)]
        ))
        for k in first.inputs:
            del self.readers[k][a]
            self.readers[k][b] = None
        self.nodes[b] = replace(second, inputs=inputs, time=first.time + second.time,
                                workspace=workspace, recomputable=False)
        self._remove(a, b, front=True)

    def _remove(self, i: int, into: int, front: bool = False) -> None:
        self.alive[i] = False
        self.readers[i] = {}
        if front:
            self.members[into] = self.members[i] + self.members[into]
        else:
            self.members[into] = self.members[into] + self.members[i]
        self.members[i] = []

    def last_essential_reads(self) -> dict[int, int]:
        """Storage → the last forward node that every schedule runs (an ancestor of a
        forward output) and that reads it; fusions only move reads later."""
        essential = {i for i in self.order("forward") if self.nodes[i].is_output}
        for i in reversed(self.order("forward")):
            if i in essential:
                essential.update(k for k in self.nodes[i].inputs
                                 if self.nodes[k].phase == "forward")
        last: dict[int, int] = {}
        for i in sorted(essential):
            for k in self.nodes[i].inputs:
                for s in self.nodes[k].storages:
                    last[s] = i
        return last

    def order(self, phase: str) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if self.alive[i] and n.phase == phase]


def _fusable(graph: _Graph, a: int, b: int, last_read: dict[int, int]) -> bool:
    """Whether ``b`` may absorb ``a`` without changing the optimum.

    Structure (what makes the fused step mean the two steps): ``a`` is a
    forward op that owns every storage it references, none pinned, and its only
    reader, in the forward or the backward, is ``b``, the very next forward
    node, which owns every storage it references too. No schedule then reads
    ``a``'s outputs but ``b``'s recomputation, and the fused node's workspace
    makes its step the larger of the two.

    Exactness:

    1. Every decision storage ``a`` reads is read by ``b`` too, or by a forward
       node after ``b`` that every schedule runs (``last_read``: an ancestor of
       a forward output); in the forward, ``a``'s inputs are then live during
       ``b``'s step anyway.
    2. The fused node is never recomputed: either ``b`` may not be (so ``a``'s
       outputs are never needed again), or ``a`` may not be and ``b``'s outputs
       are no larger than ``a``'s (recomputing ``b`` needs ``a``'s outputs
       kept, which is never better than keeping ``b``'s: no more bytes, from no
       earlier, and one op less to rerun).

    A recomputable fused node is not offered, not even as an approximation: a
    recomputation slot keeps every value read by a recomputation until the
    slot's release (``program.py``), so ``a``'s outputs outlive the fused step
    there and the coarse simulation would promise a peak the original misses.
    """
    nodes = graph.nodes
    first, second = nodes[a], nodes[b]
    if a in graph.frozen or b in graph.frozen:
        return False
    if first.phase != "forward" or second.phase != "forward" or first.is_output:
        return False
    if set(first.storages) != set(first.allocates) or not first.allocates:
        return False
    if set(second.storages) != set(second.allocates):
        return False
    if set(first.allocates) & graph.pinned or list(graph.readers[a]) != [b]:
        return False
    read_by_b = {s for k in second.inputs for s in nodes[k].storages}
    for k in first.inputs:
        for s in nodes[k].storages:
            if s not in graph.pinned and s not in read_by_b and last_read.get(s, -1) <= b:
                return False
    if not second.recomputable:
        return True
    return not first.recomputable and (
        graph.bytes_of(second.allocates) <= graph.bytes_of(first.allocates)
    )


def coarsen(problem: Problem, options: CoarsenOptions | None = None) -> Coarsening:
    """Fold ``problem`` into a smaller one; see the module docstring for the folds."""
    options = CoarsenOptions() if options is None else options
    graph = _Graph(problem)
    folds = {"forward aliases": 0, "chains": 0, "backward aliases": 0}
    if options.forward_aliases:
        # Exact: the alias's step allocates nothing, so it is never above the
        # step before it; it keeps alive exactly the storages its input keeps,
        # and is recomputed with the op that owns them; its time already counts
        # in that op's recomputation cost.
        folds["forward aliases"] = graph.fold_aliases("forward", ("input", "forward"))
    if options.chains:
        changed = True
        while changed:  # a fused node may become fusable into its own reader
            changed = False
            forward = graph.order("forward")
            last_read = graph.last_essential_reads()
            for a, b in itertools.pairwise(forward):
                if graph.alive[a] and _fusable(graph, a, b, last_read):
                    graph.fuse(a, b)
                    folds["chains"] += 1
                    changed = True
    if options.backward_aliases:
        folds["backward aliases"] = graph.fold_aliases("backward", ("tangent", "backward"))
    return _build(problem, graph, folds, not folds["backward aliases"])


def _build(problem: Problem, graph: _Graph, folds: dict[str, int], exact: bool) -> Coarsening:
    kept = [i for i in range(len(graph.nodes)) if graph.alive[i]]
    index = {i: k for k, i in enumerate(kept)}
    used = sorted({s for i in kept for s in graph.nodes[i].storages})
    storage_index = {s: k for k, s in enumerate(used)}
    nodes = tuple(
        replace(
            graph.nodes[i],
            inputs=tuple(index[k] for k in graph.nodes[i].inputs),
            storages=tuple(storage_index[s] for s in graph.nodes[i].storages),
            allocates=tuple(storage_index[s] for s in graph.nodes[i].allocates),
        )
        for i in kept
    )
    sizes = tuple(problem.storage_bytes[s] for s in used)
    choices = tuple(
        Choice(c.name, tuple(
            replace(a, overrides=tuple(
                Override(index[o.node], tuple(index[k] for k in o.inputs), o.time, o.workspace)
                for o in a.overrides
            ), drops=tuple(storage_index[s] for s in a.drops))
            for a in c.alternatives
        ))
        for c in problem.choices
    )
    # A coarse slot runs its recomputations where the gap before its node
    # starts in the original backward: folded views that follow only lower the
    # live bytes.
    position = {i: j for j, i in enumerate(problem.indices("backward"))}
    slots, start = [], 0
    for i in kept:
        if graph.nodes[i].phase == "backward":
            slots.append(start)
            start = position[i] + 1
    coarse = Problem(
        nodes, sizes, structure_hash(nodes, sizes, choices), problem.name, problem.budget,
        {**problem.meta, "coarsened_from": problem.graph_hash}, choices,
    )
    return Coarsening(
        problem, coarse, tuple(tuple(graph.members[i]) for i in kept), tuple(used),
        tuple(slots), exact, folds,
    )
