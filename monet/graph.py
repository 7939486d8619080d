"""Analysis of the joint graph: phases, storages, what the backward reads, what may be recomputed.

Storages are found from the fake tensors AOTAutograd leaves in
``node.meta["val"]``: a view or an in-place op returns a tensor sharing its
input's storage, so grouping by storage identity gives exactly the memory
that lives and dies together. Sizes are the storages' byte counts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from monet.capture import JointGraph
from monet.operators import Rewrite, Site, find_sites
from monet.solver.problem import Node, Problem, dying_reads, structure_hash


@dataclass
class AnalysedGraph:
    """The joint graph's nodes in monet's order, with the problem they make (no timings yet)."""

    joint: JointGraph
    order: list[fx.Node]
    """Non-output nodes: inputs, forward, tangents, backward."""
    index: dict[fx.Node, int]
    problem: Problem
    mutated_inputs: set[fx.Node]
    """Primals the step mutates (running statistics): updated in place after the forward."""
    sites: list[Site] = field(default_factory=list)
    """Operator variant sites, in the order of the problem's choices once profiled."""
    in_place: list[Rewrite] = field(default_factory=list)
    """Backward pointwise ops every plan runs writing over a gradient that dies with them
    (``operators/inplace.py``): the problem counts their outputs in those storages."""


def tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def is_random(node: fx.Node) -> bool:
    target = node.target
    if not (
        isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in target.tags
    ):
        return False
    # Attention kernels are tagged seeded for their optional dropout; without
    # it they are deterministic and may be recomputed like any other op.
    return _argument(node, "dropout_p", default=1.0) != 0.0


def _argument(node: fx.Node, name: str, default: object) -> object:
    """The value of the schema argument ``name`` of an aten call (``default``: absent)."""
    for position, argument in enumerate(node.target._schema.arguments):
        if argument.name != name:
            continue
        if name in node.kwargs:
            return node.kwargs[name]
        if position < len(node.args) and not argument.kwarg_only:
            return node.args[position]
        return argument.default_value if argument.has_default_value() else default
    return default


def has_side_effects(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return node.op == "call_function" and target is not operator.getitem


def analyse(
    joint: JointGraph, variants: bool = True, lossy: bool = False, forward_kernels: bool = False,
    attention: bool = True,
) -> AnalysedGraph:
    """Phases, storages and flags of every node of ``joint``, and its variant sites.

    With ``variants``, the subgraphs that a variant replaces as a whole (an MLP's backward
    into one node; with ``attention``, a written-out attention's into three) are first
    fused, in ``joint`` itself; those nodes run the captured ops, so the default step is
    unchanged.
    """
    if variants:
        from monet.operators.attention import fuse_attention_backwards
        from monet.operators.mlp import fuse_mlp_backwards
        from monet.operators.reversible import expose_twins

        fuse_mlp_backwards(joint.module)
        if attention:
            fuse_attention_backwards(joint.module)
        expose_twins(joint.module)
    graph = joint.module.graph
    output = graph.output_node()
    outs = list(output.args[0])
    forward_outs = [o for o in outs[: joint.num_forward_outputs] if isinstance(o, fx.Node)]
    backward_outs = [o for o in outs[joint.num_forward_outputs :] if isinstance(o, fx.Node)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if not n.name.startswith("tangents")]
    tangents = [n for n in placeholders if n.name.startswith("tangents")]
    forward, order = _phases(graph, primals, tangents)
    sites = find_sites(order, lossy, forward_kernels, forward) if variants else []
    if variants and lossy:
        # Kept values' bfloat16 copies: casts inserted after the other sites are
        # found (their patterns count users), for values no other site's rewrite reads.
        from monet.operators.storage import insert_storage_casts, storage_sites

        claimed = {r.node for site in sites for a in site.alternatives for r in a.rewrites}
        casts = insert_storage_casts(joint.module, forward, claimed)
        sites += [site for cast in casts for site in storage_sites(cast)]
        forward, order = _phases(graph, primals, tangents)
    in_place = []
    if variants:
        from monet.operators.inplace import forward_in_place_rewrites, in_place_rewrites

        claimed = {r.node for site in sites for a in site.alternatives for r in a.rewrites}
        in_place = (forward_in_place_rewrites(order, forward, claimed)
                    + in_place_rewrites(order, forward, claimed))
    index = {n: i for i, n in enumerate(order)}
    mutated = _mutated_inputs(output, primals)
    storage_ids: dict[StorageWeakRef, int] = {}
    sizes: list[int] = []
    forward_out_set, backward_out_set = set(forward_outs), set(backward_outs)
    nodes: list[Node] = []
    for i, n in enumerate(order):
        storages, allocates = [], []
        for ref, nbytes in _storage_refs_with_bytes(n):
            # A storage first seen at this node is one it allocates; one seen
            # before came in through an input (a view, a getitem, an in-place op).
            if ref not in storage_ids:
                storage_ids[ref] = len(sizes)
                sizes.append(nbytes)
                allocates.append(storage_ids[ref])
            sid = storage_ids[ref]
            if sid not in storages:
                storages.append(sid)
        if n in primals:
            phase = "input"
        elif n in tangents:
            phase = "tangent"
        elif n in forward:
            phase = "forward"
        else:
            phase = "backward"
        nodes.append(
            Node(
                name=n.name,
                op=_op_name(n),
                phase=phase,
                inputs=tuple(index[m] for m in n.all_input_nodes),
                storages=tuple(storages),
                allocates=tuple(allocates),
                recomputable=phase == "forward"
                and not is_random(n)
                and not has_side_effects(n)
                and _ignores_mutated_inputs(n, mutated),
                is_output=(n in forward_out_set) or (n in backward_out_set),
            )
        )
    frozen = tuple(nodes)
    problem = Problem(frozen, tuple(sizes), structure_hash(frozen, tuple(sizes)))
    # What the variants read counts too: an alternative may read a gradient later.
    variant_reads = [(index[r.node], [index[n] for n in r.inputs()])
                     for site in sites for a in site.alternatives for r in a.rewrites]
    overwritten = _overwritten_forward(problem, index, in_place, variant_reads)
    problem, in_place = _written_in_place(problem, index, in_place, variant_reads, overwritten)
    return AnalysedGraph(joint, order, index, problem, mutated,
                         _sound(sites, problem, index, variant_reads), in_place)


def _overwritten_forward(problem: Problem, index: dict[fx.Node, int], rewrites: list[Rewrite],
                         variant_reads) -> dict[int, int]:
    """Forward node → the in-place activation that writes over its storage, for each
    forward rewrite whose input's storage nothing reads after it: every value sharing
    that storage is a forward one from before the activation, no output, and read after
    it by no node and no variant.

    A batch norm's backward from its output reads what a ReLU after it would overwrite,
    so that ReLU stays out of place: on this machine's CPU that backward is the faster
    one (ResNet-18 at batch 8, 0.95 of its keep-all peak: the solver's schedule adds
    −1.6 ms with it, +0.7 ms with those ReLUs in place and the captured backwards), and
    writing them in place did not lower the least peak (185.75 MiB either way)."""
    nodes = problem.nodes
    last_read = [-1] * len(nodes)
    for i, inputs in [(i, n.inputs) for i, n in enumerate(nodes)] + list(variant_reads):
        for k in inputs:
            last_read[k] = max(last_read[k], i)
    overwritten: dict[int, int] = {}
    for rewrite in rewrites:
        at = index[rewrite.node]
        if nodes[at].phase != "forward":
            continue
        host = set(nodes[index[rewrite.overwrites]].storages)
        sharing = [j for j, n in enumerate(nodes) if j != at and host & set(n.storages)]
        if all(nodes[j].phase == "forward" and not nodes[j].is_output and j < at
               and last_read[j] <= at for j in sharing):
            overwritten.update((j, at) for j in sharing)
    return overwritten


def _written_in_place(problem: Problem, index: dict[fx.Node, int], rewrites: list[Rewrite],
                      variant_reads, overwritten: dict[int, int]
                      ) -> tuple[Problem, list[Rewrite]]:
    """The problem with each sound in-place rewrite's output counted in the storage it
    overwrites, and those rewrites: a backward one's dies there, in every schedule; a
    forward one's (``overwritten``) holds the activation's output from there on."""
    nodes, sizes = problem.nodes, problem.storage_bytes
    dying = dying_reads(problem, variant_reads)
    into: dict[int, int] = {}  # a node's own storage → the storage it writes over

    def resolve(s: int) -> int:
        while s in into:
            s = into[s]
        return s

    kept = []
    for rewrite in rewrites:
        at = index[rewrite.node]
        node, host = nodes[at], nodes[index[rewrite.overwrites]]
        if not (len(host.storages) == 1 and len(node.allocates) == 1
                and node.storages == node.allocates
                and sizes[node.allocates[0]] == sizes[host.storages[0]]):
            continue
        if node.phase == "forward":
            sound = overwritten.get(index[rewrite.overwrites]) == at
        else:
            sound = host.storages[0] in dying.get(at, ())
        if sound:
            into[node.allocates[0]] = host.storages[0]
            kept.append(rewrite)
    if not kept:
        return problem, []
    remaining = [s for s in range(len(sizes)) if s not in into]
    number = {s: k for k, s in enumerate(remaining)}

    def renumber(storages: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(dict.fromkeys(number[resolve(s)] for s in storages))

    frozen = tuple(
        replace(n, storages=renumber(n.storages),
                allocates=tuple(number[s] for s in n.allocates if s not in into))
        for n in nodes
    )
    fewer = tuple(sizes[s] for s in remaining)
    return Problem(frozen, fewer, structure_hash(frozen, fewer)), kept


def _sound(sites: list[Site], problem: Problem, index: dict[fx.Node, int],
           variant_reads) -> list[Site]:
    """The sites without in-place alternatives whose overwritten value outlives the node
    (another value shares its storage and is read later, by the graph or by a variant,
    or an output holds it)."""
    dying = dying_reads(problem, variant_reads)

    def sound(alternative) -> bool:
        return all(
            r.overwrites is None
            or set(problem.nodes[index[r.overwrites]].storages) <= dying.get(index[r.node], set())
            for r in alternative.rewrites
        )

    kept = []
    for site in sites:
        alternatives = tuple(a for a in site.alternatives if sound(a))
        if alternatives:
            kept.append(Site(site.name, alternatives))
    return kept


def _phases(graph: fx.Graph, primals: list[fx.Node], tangents: list[fx.Node]
            ) -> tuple[set[fx.Node], list[fx.Node]]:
    """The forward nodes of the joint graph, and monet's order: primals, forward,
    tangents, backward."""
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    # Forward nodes: everything that does not depend on a tangent. Autograd
    # places some of these in the backward (a detach or transpose of a saved
    # activation, a norm's saved statistics); they are still functions of the
    # forward, so each is either computed in the forward and saved, or
    # recomputed, and the solver chooses, instead of pinning its input from
    # the start of the backward.
    backward: set[fx.Node] = set(tangents)
    for n in body:
        if any(m in backward for m in n.all_input_nodes):
            backward.add(n)
    forward = {n for n in body if n not in backward}
    for n in body:
        if n.op != "call_function":
            raise NotImplementedError(f"joint graph node {n.name} is a {n.op}; expected calls only")
    order = (
        primals
        + [n for n in body if n in forward]
        + tangents
        + [n for n in body if n not in forward]
    )
    return forward, order


def _mutated_inputs(output: fx.Node, primals: list[fx.Node]) -> set[fx.Node]:
    from torch._functorch._aot_autograd.descriptors import InputMutationAOTOutput, PlainAOTInput

    mutated = set()
    for desc in output.meta.get("desc") or ():
        if isinstance(desc, InputMutationAOTOutput) and isinstance(
            desc.mutated_input, PlainAOTInput
        ):
            mutated.add(primals[desc.mutated_input.idx])
    return mutated


def _ignores_mutated_inputs(node: fx.Node, mutated: set[fx.Node]) -> bool:
    """Whether a recomputation of ``node`` in the backward, which would read the
    already-updated value of a mutated input, still gives the same tensors.

    Only a training-mode batch-norm qualifies: its normalised output and saved
    statistics come from the batch; the running statistics it reads only feed
    its new running statistics, which a recomputation discards.
    """
    if not any(m in mutated for m in node.all_input_nodes):
        return True
    return (
        node.target is torch.ops.aten._native_batch_norm_legit_functional.default
        and bool(node.args[5])
    )


def _storage_refs_with_bytes(node: fx.Node) -> list[tuple[StorageWeakRef, int]]:
    result = []
    for t in tensors_in(node.meta.get("val")):
        storage = t.untyped_storage()
        result.append((StorageWeakRef(storage), storage.nbytes()))
    return result


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))
