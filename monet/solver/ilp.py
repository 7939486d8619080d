"""The checkpointing program: which forward storages to keep, which ops to recompute, where.

Time runs over one axis: the ``F`` forward steps, then two points per backward
node ``j`` (``2j``: its recomputation slot, ``2j + 1``: the node itself). Every
storage occupies an interval of that axis and the budget bounds their sum at
every point, a single cumulative constraint (the retention-interval form of
MOCCASIN, Bartan et al. 2023), so the program has O(n) variables:

* ``keep[s]``   storage ``s`` stays from its last forward use to ``end[s]``;
* ``redo[a]``   op ``a`` is recomputed at backward slot ``slot[a]``; its
  outputs then live from ``2·slot[a]`` to ``end[s]``;
* ``end[s]``    the last backward point at which ``s`` is live;
* ``run[i]``    a forward node no output needs runs in the forward (a kept value
  it feeds needs it: ``run ≥ keep``); its outputs, reads and workspace there are
  optional intervals on it (``Structure.optional``).

Minimise Σ redo[a]·time[a] subject to: every storage a backward node reads is
kept or recomputed no later than its first reader; a recomputation reads only
kept or earlier-recomputed storages; random and side-effecting ops are never
recomputed; the cumulative bytes stay within the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from monet.solver.problem import Problem, alternative_nodes, unrecomputed_ops
from monet.solver.program import node_owner, pinned_storages, storage_owner

TIME_SCALE = 1e9
"""Objective in nanoseconds: CP-SAT needs integers; rounding moves it by < 1 ns per op."""


@dataclass
class Structure:
    """What the formulation needs, derived once from a Problem (no solver objects)."""

    forward: list[int]
    backward: list[int]
    points: int
    fixed: list[int]
    """Bytes at each point that no decision changes."""
    decision_storages: list[int]
    ops: list[int]
    """Forward ops that allocate decision storages."""
    outputs_of: dict[int, list[int]]
    forward_death: dict[int, int]
    """Decision storage → forward position after which it is freed unless kept."""
    first_read: dict[int, int]
    """Decision storage → first backward position that reads it (absent: none)."""
    last_read: dict[int, int]
    recompute_reads: dict[int, list[int]]
    """Op → decision storages its recomputation reads."""
    readers: dict[int, list[int]]
    """Decision storage → the ops whose recomputation reads it."""
    recomputable: set[int]
    cost: dict[int, float]
    """Op → seconds its recomputation adds (its owned views included), default
    variants; 0 for a ``skippable`` op."""
    workspace: dict[int, int] = field(default_factory=dict)
    exact: bool = True
    """Whether this model's peaks are the simulator's. Not where two choices' variants
    read one storage in the forward, nor where a variant overrides a forward node no
    output needs or leaves one's value out (all counted as their worst case: the
    model's schedules still fit, but its optimum and bound hold for those schedules
    only)."""
    # Operator variants. A node some alternative overrides is *touched*: its
    # reads, workspace and time are left out of everything above and given per
    # alternative here, to be switched on by the choice.
    alternatives: list[int] = field(default_factory=list)
    """Number of alternatives of each choice."""
    conditional_reads: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)
    """(choice, alternative) → (decision storage, backward position) reads it adds."""
    conditional_workspace: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(choice, alternative, point, bytes): a touched node's workspace where it runs, a
    dropped storage where the alternative fills it, and a backward storage where the
    alternative reads it later than the others do."""
    step_delta: dict[tuple[int, int], float] = field(default_factory=dict)
    """(choice, alternative) → seconds it adds to the step's own forward and backward."""
    redo_delta: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)
    """Op → (choice, alternative, seconds) its recomputation costs beyond ``cost``."""
    redo_workspace: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    """Op whose node is touched → (choice, workspace per alternative) of its recomputation."""
    no_redo: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Op → the (choice, alternative) picks under which it is not recomputed
    (:func:`monet.solver.problem.unrecomputed_ops`)."""
    extensions: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    """(choice, alternative, storage, first, last forward point): the picked alternative
    reads the storage in the forward that late; live there unless kept."""
    skippable: dict[int, float] = field(default_factory=dict)
    """Op no forward output needs (a reversible block's reconstruction, a backward
    formula's factor of forward values) → its seconds. Eager's step runs it once, in
    the backward; the program runs it in the forward only where a kept value needs
    it. Its ``cost`` is 0: recomputed, it adds nothing unless the forward runs it
    too, which :func:`monet.solver.heuristic.recompute_seconds` charges. An
    alternative may leave it unread (``reversible.keep``'s rebuild): it then runs not
    at all, saving nothing beyond the alternative's step delta, so the models charge
    ``max(0, run + redo - 1)`` of its seconds, never less than 0; and a variant's change
    of its time (``redo_delta``) only where it runs twice."""
    forced_by: dict[int, list[int]] = field(default_factory=dict)
    """Forward node the program runs only where a kept value needs it (a skippable op,
    any node no output needs but a deferred view) → the decision storages whose
    keeping makes the forward run it (those its readers allocate, transitively)."""
    conditional: frozenset[int] = frozenset()
    """Forward nodes no output needs, neither deferred views nor overridden by a variant:
    the program runs them only for kept values, and ``optional`` holds their bytes."""
    optional: list[tuple[tuple[int, ...], int, int, int, int]] = field(default_factory=list)
    """(nodes, storage, first, last, bytes): bytes live over the forward points
    ``first..last`` when one of ``nodes`` (keys of ``forced_by``) runs and, unless
    ``storage`` is -1, that storage is not kept (kept, it is live there anyway): the
    storages, reads and workspace of the nodes the forward runs only for kept values."""


def analyse(problem: Problem) -> Structure:
    nodes, sizes = problem.nodes, problem.storage_bytes
    pinned = pinned_storages(problem)
    owner = storage_owner(problem)
    owner_of = node_owner(problem, pinned, owner)
    forward = [i for i, n in enumerate(nodes) if n.phase == "forward"]
    backward = [i for i, n in enumerate(nodes) if n.phase == "backward"]
    f_pos = {node: p for p, node in enumerate(forward)}
    b_pos = {node: j for j, node in enumerate(backward)}
    n_forward, n_backward = len(forward), len(backward)
    points = n_forward + 2 * n_backward
    fixed = [0] * points
    # Intervals of fixed bytes as a difference array, summed once at the end:
    # storages span thousands of points on the zoo's graphs.
    steps = [0] * (points + 1)

    def add(start: int, stop: int, amount: int) -> None:
        if start <= stop:
            steps[start] += amount
            steps[stop + 1] -= amount

    touched = touched_nodes(problem)

    # Readers, per phase. A touched backward node's reads of backward values that not
    # every alternative makes are per alternative (``backward_reach``).
    backward_reach = _backward_reach(problem, b_pos)
    backward_last: dict[int, int] = {}
    for i in backward:
        for k in nodes[i].inputs:
            if not (i in touched and touched[i] in backward_reach.get(k, {})):
                backward_last[k] = max(backward_last.get(k, -1), b_pos[i])

    decision = sorted(
        s for i in forward for s in nodes[i].allocates if s not in pinned
    )
    decision_set = set(decision)
    forward_death: dict[int, int] = {}
    first_read: dict[int, int] = {}
    last_read: dict[int, int] = {}
    end_point = points - 1
    for i, n in enumerate(nodes):
        if n.phase in ("input",):
            add(0, end_point, sum(sizes[s] for s in n.allocates))
        elif n.phase == "tangent":
            add(n_forward, end_point, sum(sizes[s] for s in n.allocates))
    # A forward storage lives to its last forward reader, except readers that run in
    # the forward only when it is kept anyway (deferred views: a saved transpose).
    live = runs_in_every_forward(problem, forward)
    deferred = deferred_views(problem, forward, live)
    # Nodes the program runs in the forward only for kept values: their bytes are
    # optional terms (``Structure.optional``), not fixed ones.
    conditional = [i for i in forward if i not in live and i not in deferred and i not in touched]
    conditional_set = set(conditional)
    for i in forward:
        n = nodes[i]
        if i in conditional_set:
            continue
        held = set() if i in deferred and i not in touched else set(n.storages)
        if i not in touched:  # a touched node's reads depend on the choice: _forward_extensions
            held |= {s for k in n.inputs for s in nodes[k].storages} - (
                set(n.storages) if i in deferred else set())
        for s in held & decision_set:
            forward_death[s] = max(forward_death.get(s, -1), f_pos[i])
        for s in n.allocates:
            if s in pinned:
                add(f_pos[i], end_point, sizes[s])
        if i not in touched:
            fixed[f_pos[i]] += n.workspace
    dropped = dropped_storages(problem)
    extensions, shared = _forward_extensions(problem, f_pos, decision_set, dropped,
                                             forward_death)
    for s in decision:
        forward_death.setdefault(s, f_pos[owner[s]])
        if s not in dropped and owner[s] not in conditional_set:
            add(f_pos[owner[s]], forward_death[s], sizes[s])
    optional = _optional_terms(problem, conditional, f_pos, decision_set, dropped, owner,
                               forward_death)
    # Backward: storages allocated by backward nodes are fixed; reads of forward
    # storages (directly or through backward views) set first/last reads.
    storage_death: dict[int, int] = {}
    for i in backward:
        n = nodes[i]
        j = b_pos[i]
        death = n_backward - 1 if n.is_output else backward_last.get(i, j)
        for reaches in backward_reach.get(i, {}).values():
            # Every alternative holds it at least this long (the rest: ``backward_extra``).
            death = max(death, min(reaches))
        for s in n.storages:
            if s in decision_set:
                first_read[s] = min(first_read.get(s, j), j)
                last_read[s] = max(last_read.get(s, -1), death)
            elif s in n.allocates or s in storage_death:
                storage_death[s] = max(storage_death.get(s, -1), death)
        if i in touched:
            continue  # its reads and workspace depend on the choice
        for s in forward_reads(nodes, n.inputs, decision_set):
            first_read[s] = min(first_read.get(s, j), j)
            last_read[s] = max(last_read.get(s, -1), j)
        fixed[n_forward + 2 * j + 1] += n.workspace
    backward_extra, inexact = _backward_extra(problem, backward_reach, storage_death)
    for s, death in storage_death.items():
        born = b_pos[owner[s]]
        stop = end_point if nodes[owner[s]].is_output else n_forward + 2 * death + 1
        if s in dropped:
            continue  # filled only where the picked alternative fills it: below
        add(n_forward + 2 * born + 1, stop, sizes[s])
    running = 0
    for p in range(points):
        running += steps[p]
        fixed[p] += running

    ops = sorted({owner[s] for s in decision})
    outputs_of = {a: [s for s in nodes[a].allocates if s in decision_set] for a in ops}
    recompute_reads: dict[int, list[int]] = {}
    for a in ops:
        reads = set()
        for k in nodes[a].inputs:
            if nodes[k].phase == "forward":
                reads.update(s for s in nodes[k].storages if s in decision_set)
        recompute_reads[a] = sorted(reads)
    readers: dict[int, list[int]] = {}
    for a in ops:
        for s in recompute_reads[a]:
            readers.setdefault(s, []).append(a)
    cost = {a: 0.0 for a in ops}
    for i in forward:
        if i in owner_of and owner_of[i] in cost:
            cost[owner_of[i]] += nodes[i].time
    # An op no forward output needs runs once in eager's step, for the backward.
    # Recomputed rather than run in the forward, it still runs once: it costs
    # nothing here, and ``skippable`` keeps its seconds for when it runs twice.
    # Forward nodes some backward node reads, directly or through forward nodes.
    # An alternative's backward reads count too: a forward op only a variant's backward
    # reads runs once where that variant is picked, and not at all where none is.
    backward_set = set(backward)
    read_by_backward = _ancestors(problem, [
        *(k for i in backward for k in nodes[i].inputs if nodes[k].phase == "forward"),
        *(k for choice in problem.choices for alternative in choice.alternatives
          for o in alternative.overrides if o.node in backward_set
          for k in o.inputs if nodes[k].phase == "forward")])
    skippable = {a: cost[a] for a in ops if a not in live and a in read_by_backward}
    forced_by = _forced_by(problem, [*conditional, *skippable], owner, decision_set)
    cost.update(dict.fromkeys(skippable, 0.0))
    recomputable = {a for a in ops if nodes[a].recomputable}
    workspace = {a: nodes[a].workspace for a in ops}
    structure = Structure(
        forward, backward, points, fixed, decision, ops, outputs_of, forward_death,
        first_read, last_read, recompute_reads, readers, recomputable, cost, workspace,
        # A variant's reads or dropped values in nodes the forward may skip are counted
        # as if those nodes always ran.
        exact=not shared and not inexact and not any(
            i not in live and i not in deferred for i in touched if i in f_pos)
        and not any(owner[s] in conditional_set for s in dropped),
        extensions=extensions, skippable=skippable, forced_by=forced_by,
        conditional=frozenset(conditional), optional=optional,
    )
    if problem.choices:
        _add_choices(problem, structure, owner_of, f_pos, b_pos, decision_set)
        for s, (c, dropping) in dropped.items():
            # Filled only where the picked alternative fills it.
            for k in range(len(problem.choices[c].alternatives)):
                if k in dropping:
                    continue
                if owner[s] in f_pos:
                    span = range(f_pos[owner[s]], forward_death[s] + 1)
                else:
                    last = max(storage_death[s], backward_extra.get((s, c), {}).get(k, -1))
                    span = range(n_forward + 2 * b_pos[owner[s]] + 1, n_forward + 2 * last + 2)
                structure.conditional_workspace += [(c, k, p, sizes[s]) for p in span]
        for (s, c), reaches in backward_extra.items():
            # Held past its death where the picked alternative reads it later.
            if s in dropped:
                continue  # counted with its fill above
            for k, reach in reaches.items():
                structure.conditional_workspace += [
                    (c, k, p, sizes[s])
                    for p in range(n_forward + 2 * storage_death[s] + 2, n_forward + 2 * reach + 2)
                ]
        for c, choice in enumerate(problem.choices):
            for k, alternative in enumerate(choice.alternatives):
                for a in sorted(unrecomputed_ops(problem, alternative) & recomputable):
                    structure.no_redo.setdefault(a, []).append((c, k))
    return structure


def _forward_extensions(problem: Problem, f_pos, decision_set: set[int], dropped,
                        forward_death: dict[int, int]):
    """How long the forward holds each storage that an overridden forward node reads.

    ``forward_death`` (from the other readers) is raised to the least reach over the
    alternatives; where an alternative reaches further, (choice, alternative,
    storage, first point, last point) is an extension, live when that alternative
    is picked and the storage is not kept (kept, it is live from there anyway).
    Returns the extensions and whether some storage is extended by two choices
    (then each is raised to the furthest reach, and the model over-counts).
    """
    nodes = problem.nodes
    reach: dict[int, dict[int, list[int]]] = {}  # storage → choice → reach per alternative
    for c, choice in enumerate(problem.choices):
        per_alternative = alternative_nodes(problem, choice)
        for k, effective in enumerate(per_alternative):
            empty = set(choice.alternatives[k].drops)
            for i, o in effective.items():
                if i not in f_pos:
                    continue
                for s in {s for j in o.inputs for s in nodes[j].storages}:
                    if s in decision_set and s not in empty:
                        reaches = reach.setdefault(s, {}).setdefault(
                            c, [-1] * len(per_alternative))
                        reaches[k] = max(reaches[k], f_pos[i])
    extensions: list[tuple[int, int, int, int, int]] = []
    shared = False
    for s, by_choice in reach.items():
        if len(by_choice) > 1:
            shared = True
            forward_death[s] = max(forward_death.get(s, -1),
                                   *(r for reaches in by_choice.values() for r in reaches))
            continue
        ((c, reaches),) = by_choice.items()
        filling = [r for k, r in enumerate(reaches)
                   if k not in dropped.get(s, (c, set()))[1]]
        base = max(forward_death.get(s, -1), min(filling, default=-1))
        forward_death[s] = base
        extensions += [(c, k, s, base + 1, r) for k, r in enumerate(reaches) if r > base]
    return extensions, shared


def _optional_terms(problem: Problem, conditional: list[int], f_pos, decision_set: set[int],
                    dropped, owner: dict[int, int], forward_death: dict[int, int]):
    """See ``Structure.optional``: a conditional node's own storages (from it to their
    last reader that always runs), its workspace, and how far its reads hold storages
    past that (one piece per reader, live while a reader at or after it runs)."""
    nodes, sizes = problem.nodes, problem.storage_bytes
    optional: list[tuple[tuple[int, ...], int, int, int, int]] = []
    reach: dict[int, list[tuple[int, int]]] = {}  # storage → (position, conditional reader)
    for i in conditional:
        n = nodes[i]
        if n.workspace:
            optional.append(((i,), -1, f_pos[i], f_pos[i], n.workspace))
        for s in n.allocates:
            if s in decision_set and s not in dropped:
                optional.append(((i,), -1, f_pos[i], forward_death[s], sizes[s]))
        held = set(n.storages) | {s for k in n.inputs for s in nodes[k].storages}
        for s in held & decision_set:
            if f_pos[i] > forward_death[s] and s not in dropped:
                reach.setdefault(s, []).append((f_pos[i], i))
    for s, readers in reach.items():
        readers.sort()
        start = forward_death[s] + 1
        for k, (position, _) in enumerate(readers):
            if position >= start:
                later = tuple(i for _, i in readers[k:])
                optional.append((later, s, start, position, sizes[s]))
                start = position + 1
    return optional


def running(structure: Structure, kept) -> set[int]:
    """The forward nodes of ``Structure.forced_by`` the program runs for ``kept``."""
    kept = set(kept)
    return {i for i, forcing in structure.forced_by.items() if any(s in kept for s in forcing)}


def optional_bytes(structure: Structure, kept) -> list[tuple[int, int, int]]:
    """(first, last, bytes) of the ``Structure.optional`` terms live for ``kept``."""
    kept = set(kept)
    runs = running(structure, kept)
    return [(first, last, amount) for nodes, s, first, last, amount in structure.optional
            if (s == -1 or s not in kept) and any(i in runs for i in nodes)]


def _forced_by(problem: Problem, conditional, owner: dict[int, int],
               decision_set: set[int]) -> dict[int, list[int]]:
    """See ``Structure.forced_by``: a kept storage makes the forward run the op that
    allocates it and every node before it that op reads."""
    nodes = problem.nodes
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.phase == "forward":
            for k in n.inputs:
                readers.setdefault(k, []).append(i)
    by_op: dict[int, list[int]] = {}
    for s, a in owner.items():
        if s in decision_set:
            by_op.setdefault(a, []).append(s)
    result = {}
    for r in conditional:
        stack, seen = [r], set()
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(readers.get(i, ()))
        result[r] = sorted(s for i in seen for s in by_op.get(i, ()))
    return result


def _ancestors(problem: Problem, start) -> set[int]:
    """``start`` and every node they read, directly or not."""
    nodes = problem.nodes
    stack = list(start)
    found: set[int] = set()
    while stack:
        i = stack.pop()
        if i not in found:
            found.add(i)
            stack.extend(nodes[i].inputs)
    return found


def runs_in_every_forward(problem: Problem, forward: list[int]) -> set[int]:
    """Forward nodes every schedule runs: the ancestors of the forward's outputs."""
    return _ancestors(problem, (i for i in forward if problem.nodes[i].is_output))


def deferred_views(problem: Problem, forward: list[int], live: set[int] | None = None
                   ) -> set[int]:
    """Forward views no output needs whose forward readers are such views of the same
    storages (a transpose or a getitem only the backward reads).

    The program runs one in the forward only when its storages are kept (it is
    saved, or a saved one reads it); otherwise it is recomputed with its storage's
    op. Its read of those storages therefore never ends their forward life.
    """
    nodes = problem.nodes
    live = runs_in_every_forward(problem, forward) if live is None else live
    readers: dict[int, list[int]] = {}
    for i in forward:
        for k in nodes[i].inputs:
            readers.setdefault(k, []).append(i)
    result: set[int] = set()
    for i in reversed(forward):
        n = nodes[i]
        if i in live or n.allocates or not n.storages:
            continue
        if all(d in result and set(nodes[d].storages) == set(n.storages)
               for d in readers.get(i, ())):
            result.add(i)
    return result


def _backward_reach(problem: Problem, b_pos: dict[int, int]) -> dict[int, dict[int, list[int]]]:
    """Backward value → choice → the last backward position at which each alternative
    reads it (-1: none), for the values a choice's alternatives read at different places
    (an alternative that reads another gradient than the captured node)."""
    nodes = problem.nodes
    owner = problem.storage_owner()
    result: dict[int, dict[int, list[int]]] = {}
    for c, choice in enumerate(problem.choices):
        per_alternative = alternative_nodes(problem, choice)
        inside = [i for i in per_alternative[0] if i in b_pos]
        if not inside:
            continue
        last: list[dict[int, int]] = [{} for _ in per_alternative]
        for k, effective in enumerate(per_alternative):
            for i in inside:
                for v in effective[i].inputs:
                    # A backward view of a forward storage is read alike by every
                    # alternative (the problem's validation): its reads stay common.
                    if nodes[v].phase == "backward" and all(
                            nodes[owner[s]].phase in ("backward", "tangent")
                            for s in nodes[v].storages):
                        last[k][v] = max(last[k].get(v, -1), b_pos[i])
        for v in set().union(*last):
            reaches = [reads.get(v, -1) for reads in last]
            if len(set(reaches)) > 1:
                result.setdefault(v, {})[c] = reaches
    return result


def _backward_extra(problem: Problem, backward_reach, storage_death: dict[int, int]):
    """(storage, choice) → {alternative: last backward position} where that alternative
    holds a backward storage past ``storage_death`` (its reads of it come later), and
    whether two choices extend one storage (each is then held to the furthest reach in
    ``storage_death`` itself, and the model over-counts)."""
    nodes = problem.nodes
    by_storage: dict[int, dict[int, list[int]]] = {}
    for v, by_choice in backward_reach.items():
        for s in nodes[v].storages:
            if s not in storage_death:
                continue  # a tangent's or an input's: live through the backward anyway
            for c, reaches in by_choice.items():
                held = by_storage.setdefault(s, {}).setdefault(c, [-1] * len(reaches))
                by_storage[s][c] = [max(a, b) for a, b in zip(held, reaches, strict=True)]
    extra: dict[tuple[int, int], dict[int, int]] = {}
    inexact = False
    for s, by_choice in by_storage.items():
        if len(by_choice) > 1:
            inexact = True
            storage_death[s] = max(storage_death[s], *(r for rs in by_choice.values() for r in rs))
            continue
        ((c, reaches),) = by_choice.items()
        later = {k: r for k, r in enumerate(reaches) if r > storage_death[s]}
        if later:
            extra[(s, c)] = later
    return extra, inexact


def dropped_storages(problem: Problem) -> dict[int, tuple[int, set[int]]]:
    """Storage → (choice, the alternatives that drop it)."""
    result: dict[int, tuple[int, set[int]]] = {}
    for c, choice in enumerate(problem.choices):
        for k, alternative in enumerate(choice.alternatives):
            for s in alternative.drops:
                result.setdefault(s, (c, set()))[1].add(k)
    return result


def touched_nodes(problem: Problem) -> dict[int, int]:
    """Node → the choice whose alternatives override it."""
    return {
        o.node: c
        for c, choice in enumerate(problem.choices)
        for alternative in choice.alternatives
        for o in alternative.overrides
    }


def forward_reads(nodes, inputs, decision_set: set[int]) -> set[int]:
    """Decision storages a backward node reads through forward values."""
    return {
        s
        for k in inputs
        if nodes[k].phase == "forward"
        for s in nodes[k].storages
        if s in decision_set
    }


def _add_choices(problem, st: Structure, owner_of, f_pos, b_pos, decision_set) -> None:
    nodes = problem.nodes
    n_forward = len(st.forward)
    for c, choice in enumerate(problem.choices):
        st.alternatives.append(len(choice.alternatives))
        amounts: dict[int, list[int]] = {}  # point → the node's workspace per alternative
        for k, effective in enumerate(alternative_nodes(problem, choice)):
            reads: list[tuple[int, int]] = []
            delta = 0.0
            for i, o in effective.items():
                inputs, seconds, workspace = o.inputs, o.time, o.workspace
                delta += seconds - nodes[i].time
                if nodes[i].phase == "forward":
                    point = f_pos[i]
                    a = owner_of.get(i)
                    if a is not None and a in st.cost and seconds != nodes[i].time:
                        st.redo_delta.setdefault(a, []).append((c, k, seconds - nodes[i].time))
                    if i in st.workspace:
                        st.redo_workspace.setdefault(i, (c, [0] * len(choice.alternatives)))
                        st.redo_workspace[i][1][k] = workspace
                else:
                    j = b_pos[i]
                    point = n_forward + 2 * j + 1
                    reads += [(s, j) for s in sorted(forward_reads(nodes, inputs, decision_set))]
                amounts.setdefault(point, [0] * len(choice.alternatives))[k] = workspace
            st.conditional_reads[(c, k)] = reads
            st.step_delta[(c, k)] = delta
        for point, per_alternative in amounts.items():
            # An in-place alternative's workspace is negative: the least goes into the
            # fixed profile (which holds the overwritten value there), so every
            # conditional amount is a non-negative demand, as CP-SAT's cumulative needs.
            least = min(0, *per_alternative)
            st.fixed[point] += least
            st.conditional_workspace += [(c, k, point, w - least)
                                         for k, w in enumerate(per_alternative) if w != least]
    for a in st.redo_workspace:
        st.workspace[a] = 0  # counted per alternative instead


@dataclass(frozen=True)
class Solution:
    kept: tuple[int, ...]
    recompute: tuple[tuple[int, int], ...]
    status: str
    objective: float
    bound: float | None
    capacity: int | None
    """The capacity of the minimum-budget model; None for the time model."""
    seconds: float
    variants: tuple[int, ...] = ()


Hint = tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]
"""(kept, recompute, variants) of a known schedule."""


@dataclass(frozen=True)
class Neighbourhood:
    """A part of the schedules: those recomputing every op of ``recomputed`` and none
    outside ``recomputable`` (None: any), with each choice in ``variants`` held to
    that alternative."""

    recomputed: frozenset[int] = frozenset()
    recomputable: frozenset[int] | None = None
    variants: dict[int, int] = field(default_factory=dict)


def conditional_readers(st: Structure) -> dict[int, list[tuple[int, int, int]]]:
    """Decision storage → (choice, alternative, backward position) that read it."""
    result: dict[int, list[tuple[int, int, int]]] = {}
    for (c, k), reads in st.conditional_reads.items():
        for s, j in reads:
            result.setdefault(s, []).append((c, k, j))
    return result


def redo_weights(st: Structure) -> dict[int, int]:
    """Op → the integer nanoseconds the exact models charge for recomputing it (at least
    1, so that no recomputation is free); a skippable op's seconds, charged with
    ``run - 1`` on top where the model knows whether the forward runs it."""
    weights = {a: max(1, round(st.cost[a] * TIME_SCALE)) for a in st.ops}
    weights.update({r: max(1, round(seconds * TIME_SCALE))
                    for r, seconds in st.skippable.items()})
    return weights


def solve_cpsat(
    problem: Problem,
    budget: int | None,
    time_limit: float = 10.0,
    workers: int = 2,
    hint: Hint | None = None,
    log_callback=None,
    stop_at: int | None = None,
    within: Neighbourhood | None = None,
) -> Solution:
    """Solve with OR-tools CP-SAT.

    With ``budget`` None, minimise the peak instead of the time (the smallest
    feasible budget), stopping early once it is at most ``stop_at``; otherwise
    minimise recomputation time within ``budget``. With ``within``, only the
    schedules of that neighbourhood are searched (the status and bound are then
    the neighbourhood's).
    """
    from ortools.sat.python import cp_model

    started = time.perf_counter()
    st = analyse(problem)
    sizes = problem.storage_bytes
    n_forward = len(st.forward)
    last_point = st.points - 1
    backward_points = 2 * len(st.backward)
    model = cp_model.CpModel()
    intervals, demands = [], []
    for p, amount in enumerate(st.fixed):
        if amount:
            intervals.append(model.NewFixedSizeIntervalVar(p, 1, f"fixed{p}"))
            demands.append(amount)
    keep = {}
    redo = {a: model.NewBoolVar(f"redo{a}") for a in st.ops}
    # One literal per alternative of each choice, exactly one true.
    pick = {}
    for c, count in enumerate(st.alternatives):
        for k in range(count):
            pick[c, k] = model.NewBoolVar(f"pick{c}_{k}")
        model.AddExactlyOne(pick[c, k] for k in range(count))
    for c, k, point, amount in st.conditional_workspace:
        intervals.append(model.NewOptionalFixedSizeIntervalVar(point, 1, pick[c, k], f"cws{c}"))
        demands.append(amount)
    cond_readers = conditional_readers(st)

    def both(x, y, name: str):
        """A literal equal to x ∧ y."""
        z = model.NewBoolVar(name)
        model.AddBoolAnd([x, y]).OnlyEnforceIf(z)
        model.AddBoolOr([x.Not(), y.Not()]).OnlyEnforceIf(z.Not())
        return z
    slot = {}
    for a in st.ops:
        if a not in st.recomputable or not backward_points:
            model.Add(redo[a] == 0)
        for c, k in st.no_redo.get(a, ()):
            model.AddImplication(pick[c, k], redo[a].Not())
        reads = [st.first_read[s] for s in st.outputs_of[a] if s in st.first_read]
        upper = min(reads) if reads else max(len(st.backward) - 1, 0)
        slot[a] = model.NewIntVar(0, upper, f"slot{a}")
    readers = st.readers
    owner = storage_owner(problem)
    end = {}
    for s in st.decision_storages:
        a = owner[s]
        lower = 2 * st.last_read[s] + 1 if s in st.last_read else 0
        end[s] = model.NewIntVar(lower, max(lower, backward_points - 1), f"end{s}")
        keep[s] = model.NewBoolVar(f"keep{s}")
        model.AddImplication(redo[a], keep[s].Not())
        needed = s in st.first_read
        conditional = cond_readers.get(s, [])
        if needed:
            model.AddBoolOr([keep[s], redo[a]])
        elif s in readers or conditional:
            reasons = [redo[w] for w in readers.get(s, ())]
            reasons += [pick[c, k] for c, k, _ in conditional]
            model.AddBoolOr(reasons).OnlyEnforceIf(keep[s])
        else:
            model.Add(keep[s] == 0)
        for c, k, j in conditional:
            # The chosen variant reads s at backward position j.
            model.AddBoolOr([keep[s], redo[a]]).OnlyEnforceIf(pick[c, k])
            model.Add(slot[a] <= j).OnlyEnforceIf([redo[a], pick[c, k]])
            model.Add(end[s] >= 2 * j + 1).OnlyEnforceIf(pick[c, k])
        if not backward_points:
            model.Add(keep[s] == 0)
            continue
        start_keep = st.forward_death[s] + 1
        kept_size = model.NewIntVar(0, st.points, f"keptsize{s}")
        model.Add(kept_size == n_forward + end[s] + 1 - start_keep)
        intervals.append(
            model.NewOptionalIntervalVar(
                start_keep, kept_size, n_forward + end[s] + 1, keep[s], f"kept{s}"
            )
        )
        demands.append(sizes[s])
        redo_size = model.NewIntVar(1, backward_points, f"redosize{s}")
        model.Add(2 * slot[a] + redo_size == end[s] + 1).OnlyEnforceIf(redo[a])
        redo_start = model.NewIntVar(n_forward, last_point, f"redostart{s}")
        model.Add(redo_start == n_forward + 2 * slot[a])
        intervals.append(
            model.NewOptionalIntervalVar(
                redo_start, redo_size, n_forward + end[s] + 1, redo[a], f"redo{s}"
            )
        )
        demands.append(sizes[s])
    for c, k, s, first, last in st.extensions:
        # The picked alternative reads s in the forward until ``last``: live unless kept.
        extended = both(pick[c, k], keep[s].Not(), f"ext{s}_{k}")
        intervals.append(model.NewOptionalFixedSizeIntervalVar(
            first, last - first + 1, extended, f"ext{s}_{c}_{k}"))
        demands.append(sizes[s])
    # Forward nodes that run only for kept values: run ≥ keep of what they feed.
    run = {}
    runs_in_hint = running(st, hint[0]) if hint is not None else set()
    for i, forcing in st.forced_by.items():
        run[i] = model.NewBoolVar(f"run{i}")
        for s in forcing:
            model.AddImplication(keep[s], run[i])
        if hint is not None:
            model.AddHint(run[i], i in runs_in_hint)
    for index, (runners, s, first, last, amount) in enumerate(st.optional):
        if len(runners) == 1 and s == -1:
            active = run[runners[0]]
        else:  # one of the runners runs and s is not kept
            active = model.NewBoolVar(f"opt{index}")
            for i in runners:
                model.AddBoolOr([run[i].Not(), active] + ([keep[s]] if s != -1 else []))
        intervals.append(model.NewOptionalFixedSizeIntervalVar(
            first, last - first + 1, active, f"opt{index}"))
        demands.append(amount)
    for a in st.ops:
        if st.workspace[a] and backward_points:
            start = model.NewIntVar(n_forward, last_point, f"wsstart{a}")
            model.Add(start == n_forward + 2 * slot[a])
            intervals.append(model.NewOptionalFixedSizeIntervalVar(start, 1, redo[a], f"ws{a}"))
            demands.append(st.workspace[a])
        if a in st.redo_workspace and backward_points:
            c, amounts = st.redo_workspace[a]
            for k, amount in enumerate(amounts):
                if amount:
                    start = model.NewIntVar(n_forward, last_point, f"wsstart{a}_{k}")
                    model.Add(start == n_forward + 2 * slot[a])
                    active = both(redo[a], pick[c, k], f"redo{a}_{k}")
                    intervals.append(
                        model.NewOptionalFixedSizeIntervalVar(start, 1, active, f"ws{a}_{k}")
                    )
                    demands.append(amount)
        for s in st.recompute_reads[a]:
            b = owner[s]
            model.AddBoolOr([keep[s], redo[b]]).OnlyEnforceIf(redo[a])
            model.Add(slot[b] <= slot[a]).OnlyEnforceIf([redo[a], redo[b]])
            model.Add(end[s] >= 2 * slot[a]).OnlyEnforceIf(redo[a])
    if budget is None:
        most = sum(sizes) + max(st.fixed, default=0) + sum(st.workspace.values())
        most += sum(amount for *_, amount in st.conditional_workspace)
        most += sum(sum(amounts) for _, amounts in st.redo_workspace.values())
        most += sum(sizes[s] for _, _, s, _, _ in st.extensions)
        most += sum(amount for *_, amount in st.optional)
        capacity = model.NewIntVar(0, most, "capacity")
        model.AddCumulative(intervals, demands, capacity)
        model.Minimize(capacity)
    else:
        capacity = None
        model.AddCumulative(intervals, demands, budget)
        weights = redo_weights(st)
        terms = [weights[a] * redo[a] for a in st.ops]
        for r in st.skippable:
            # Run once (kept from the forward, or recomputed) it adds nothing; twice, its
            # time; not at all (unread under an alternative), nothing: unrun ≥ 1 - run - redo.
            unrun = model.NewBoolVar(f"unrun{r}")
            model.AddBoolOr([run[r], redo[r], unrun])
            terms += [weights[r] * run[r], weights[r] * unrun, -weights[r]]
        terms += [round(d * TIME_SCALE) * pick[ck] for ck, d in st.step_delta.items() if d]
        for a, deltas in st.redo_delta.items():
            for c, k, d in deltas:
                # A skippable op's second run alone runs the variant's time anew.
                active = both(redo[a], pick[c, k], f"rd{a}_{k}")
                if a in st.skippable:
                    active = both(active, run[a], f"rdr{a}_{k}")
                terms.append(round(d * TIME_SCALE) * active)
        model.Minimize(sum(terms))
    if within is not None:
        for a in within.recomputed:
            model.Add(redo[a] == 1)
        if within.recomputable is not None:
            for a in set(st.ops) - within.recomputable:
                model.Add(redo[a] == 0)
        for c, k in within.variants.items():
            model.Add(pick[c, k] == 1)
    if hint is not None:
        kept_hint, redo_hint = set(hint[0]), dict(hint[1])
        for s, var in keep.items():
            model.AddHint(var, s in kept_hint)
        for a, var in redo.items():
            model.AddHint(var, a in redo_hint)
            if a in redo_hint:
                model.AddHint(slot[a], redo_hint[a])
        for (c, k), var in pick.items():
            model.AddHint(var, len(hint[2]) > c and hint[2][c] == k)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.1, time_limit - (time.perf_counter() - started))
    solver.parameters.num_workers = workers
    if log_callback is not None:
        solver.parameters.log_search_progress = True
        solver.log_callback = log_callback
    callback = None
    if budget is None and stop_at is not None:

        class _StopWhenBelow(cp_model.CpSolverSolutionCallback):
            def on_solution_callback(self) -> None:
                if self.ObjectiveValue() <= stop_at:
                    self.StopSearch()

        callback = _StopWhenBelow()
    code = solver.Solve(model, callback)
    seconds = time.perf_counter() - started
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        infeasible = code == cp_model.INFEASIBLE and st.exact
        return Solution((), (), "infeasible" if infeasible else "unknown", float("inf"), None,
                        None, seconds)
    kept = tuple(s for s in st.decision_storages if solver.Value(keep[s]))
    recompute = tuple((a, solver.Value(slot[a])) for a in st.ops if solver.Value(redo[a]))
    variants = tuple(
        next(k for k in range(count) if solver.Value(pick[c, k]))
        for c, count in enumerate(st.alternatives)
    )
    status = "optimal" if code == cp_model.OPTIMAL and st.exact else "feasible"
    bound = solver.BestObjectiveBound() if st.exact else None
    if budget is None:
        return Solution(kept, recompute, status, solver.ObjectiveValue(), bound,
                        int(solver.Value(capacity)), seconds, variants)
    return Solution(kept, recompute, status, solver.ObjectiveValue() / TIME_SCALE,
                    None if bound is None else bound / TIME_SCALE, None, seconds, variants)
