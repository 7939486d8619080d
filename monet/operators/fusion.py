"""A backward subgraph fused into one node that replays the captured ops.

A variant that replaces several backward ops as a whole (an MLP's backward, an
attention's) needs them as one node: its alternative is then one override of
that node. The fused default runs the captured ops themselves, bit for bit the
unfused graph. It holds its inputs to its end, where the unfused graph may free
one earlier, and makes its outputs before its last op: so a fused subgraph is
chosen small, of ops that read the same values (an MLP's: fc1's three gradients,
which all read ``a``'s gradient), leaving the ops before it as captured.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import torch
from torch import fx


def _structure(nodes: list[fx.Node], inputs: list[fx.Node]) -> str:
    """A digest of a subgraph's ops and constants (not its shapes): part of its profile key."""
    position = {n: f"%{k}" for k, n in enumerate(inputs)}
    position.update({n: f"${k}" for k, n in enumerate(nodes)})
    text = ";".join(
        f"{n.target}{fx.node.map_arg((n.args, n.kwargs), lambda m: position[m])}" for n in nodes
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def replay(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], name: str):
    """A function named ``name`` running ``nodes`` (in graph order) on ``inputs``, returning
    ``outputs``: the captured ops themselves, so the fused default is bit for bit the
    unfused graph."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"input_{k}") for k, n in enumerate(inputs)}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda m: env[m])
    graph.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(torch.nn.Module(), graph)

    def fused(*values):
        return module(*values)

    fused.__name__ = name
    fused.__qualname__ = f"{name}[{_structure(nodes, inputs)}]"
    return fused


def only_read_inside(members: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> bool:
    """Whether every member but the outputs is read by members alone, each listed once."""
    inner = set(members)
    if len(inner) != len(members):
        return False
    return all(set(n.users) <= inner for n in inner - set(outputs))


def fuse(graph: fx.Graph, members: list[fx.Node], outputs: list[fx.Node], name: str,
         after: Sequence[fx.Node] = ()) -> fx.Node:
    """Replace ``members`` by one node replaying them, returning ``outputs`` (a tuple;
    each output's users read a ``getitem`` of it). It runs after its inputs and the
    nodes ``after``."""
    order = {n: k for k, n in enumerate(graph.nodes)}
    members = sorted(members, key=order.__getitem__)
    inner = set(members)
    inputs = list(dict.fromkeys(i for n in members for i in n.all_input_nodes if i not in inner))
    anchor = max([*inputs, *after], key=order.__getitem__)
    with graph.inserting_after(anchor):
        fused = graph.call_function(replay(members, inputs, outputs, name), tuple(inputs))
    fused.meta["val"] = tuple(o.meta["val"] for o in outputs)
    with graph.inserting_after(fused):
        items = []
        for k, output in enumerate(outputs):
            item = graph.call_function(operator.getitem, (fused, k))
            item.meta["val"] = output.meta["val"]
            items.append(item)
    for output, item in zip(outputs, items, strict=True):
        output.replace_all_uses_with(item)
    for n in reversed(members):
        graph.erase_node(n)
    return fused


aten = torch.ops.aten

# Forward ops that pick among values: a variant whose forward rounds differently
# upstream of one may change what it picks.
_DISCRETE = {
    aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
    aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default,
    aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim, aten.max.default,
    aten.min.default, aten.amax.default, aten.amin.default, aten.kthvalue.default,
    aten.median.default, aten.median.dim, aten.sort.default, aten.topk.default,
    aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.lt.Tensor, aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar,
}


def feeds_a_discrete_op(start: fx.Node) -> bool:
    """Whether a forward op downstream of ``start`` picks among values (argmax, compare)."""
    backward = _backward(start.graph)
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node.target in _DISCRETE:
            return True
        for user in node.users:
            if user not in seen and user not in backward:
                seen.add(user)
                stack.append(user)
    return False


def _backward(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that depend on a tangent (graph.py's split, for one question here)."""
    result: set[fx.Node] = set()
    for n in graph.nodes:
        if (n.op == "placeholder" and n.name.startswith("tangents")) or any(
                m in result for m in n.all_input_nodes):
            result.add(n)
    return result
