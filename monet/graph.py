"""Analysis of the joint graph: phases, storages, what the backward reads, what may be recomputed.

Storages are found from the fake tensors AOTAutograd leaves in
``node.meta["val"]``: a view or an in-place op returns a tensor sharing its
input's storage, so grouping by storage identity gives exactly the memory
that lives and dies together. Sizes are the storages' byte counts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from monet.capture import JointGraph
from monet.solver.problem import Node, Problem, structure_hash


@dataclass
class AnalysedGraph:
    """The joint graph's nodes in monet's order, with the problem they make (no timings yet)."""

    joint: JointGraph
    order: list[fx.Node]
    """Non-output nodes: inputs, forward, tangents, backward."""
    index: dict[fx.Node, int]
    problem: Problem


def tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def is_random(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and (
        torch.Tag.nondeterministic_seeded in target.tags
    )


def has_side_effects(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return node.op == "call_function" and target is not operator.getitem


def analyse(joint: JointGraph) -> AnalysedGraph:
    """Phases, storages and flags of every node of ``joint``."""
    graph = joint.module.graph
    output = graph.output_node()
    outs = list(output.args[0])
    forward_outs = [o for o in outs[: joint.num_forward_outputs] if isinstance(o, fx.Node)]
    backward_outs = [o for o in outs[joint.num_forward_outputs :] if isinstance(o, fx.Node)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if not n.name.startswith("tangents")]
    tangents = [n for n in placeholders if n.name.startswith("tangents")]
    # Forward nodes: the ancestors of the forward outputs.
    forward: set[fx.Node] = set()
    stack = list(forward_outs)
    while stack:
        n = stack.pop()
        if n in forward or n.op == "placeholder":
            continue
        forward.add(n)
        stack.extend(n.all_input_nodes)
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    # An op's outputs that only the backward reads (a norm's saved statistics)
    # are still extracted in the forward: a getitem is free, and treating it as
    # forward lets those small outputs be kept without keeping the op's others.
    for n in body:
        if n.target is operator.getitem and n.args[0] in forward:
            forward.add(n)
    for n in body:
        if n.op != "call_function":
            raise NotImplementedError(f"joint graph node {n.name} is a {n.op}; expected calls only")
    order = (
        primals
        + [n for n in body if n in forward]
        + tangents
        + [n for n in body if n not in forward]
    )
    index = {n: i for i, n in enumerate(order)}
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
                recomputable=phase == "forward" and not is_random(n) and not has_side_effects(n),
                is_output=(n in forward_out_set) or (n in backward_out_set),
            )
        )
    frozen = tuple(nodes)
    problem = Problem(frozen, tuple(sizes), structure_hash(frozen, tuple(sizes)))
    return AnalysedGraph(joint, order, index, problem)


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
