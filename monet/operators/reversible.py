"""A reversible stack's backward reading the forward's values instead of rebuilding them.

A reversible block (``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``, RevViT) keeps
nothing: its backward rebuilds the inputs from the outputs (``X2 = Y2 -
G(Y1)``, ``X1 = Y1 - F(X2)``), running F and G once more, and differentiates
those reruns. Captured, the rebuild is a set of forward nodes that only the
backward reads. Each of them computes a value the forward computed already:
value numbering the joint graph, with the one rule ``sub(add(a, b), b') = a``
where ``b'`` numbers as ``b``, finds for every rebuilt value its forward twin.

The variant ``reversible.keep`` points every backward read of a rebuilt value
at its twin: the backward then reads the forward's activations (kept or
recomputed, as the solver decides, as for any model) and the rebuild runs no
more (its nodes hold empty tensors: the problem's ``drops``). The captured
graph, ``default``, is the reversible step itself. Results differ from the
captured step's by float rounding only: ``Y2 - G(Y1)`` rounds at the magnitude of
``Y2`` and ``G(Y1)``, so the rebuilt ``X2`` carries that error (the kept one none).

One choice covers the whole graph: the rebuild of a block starts from the
rebuilt outputs of the block above, so a mix of rebuilt and kept blocks would
need the rebuild to start from a kept value, which one graph cannot express
as a per-block alternative.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from monet.graph import has_side_effects, is_random, tensors_in
from monet.operators import Alternative, Rewrite, Site

aten = torch.ops.aten

_IDENTITIES = {aten.detach.default, aten.alias.default, aten.lift_fresh.default}
"""Ops whose value is their input's (``requires_grad_`` on a detached leaf traces to them)."""


def _layout(node: fx.Node) -> object:
    """Shape, strides, dtype and device of each tensor ``node`` holds."""
    return [(tuple(t.shape), t.stride(), t.dtype, t.device)
            for t in tensors_in(node.meta.get("val"))]


def _fresh_target(node: fx.Node) -> bool:
    """Never equal to another call: random, mutating or not an aten op, or allocating
    uninitialised memory (``empty_like``: two are not one value)."""
    return (is_random(node) or has_side_effects(node)
            or "empty" in getattr(node.target, "__name__", ""))


def value_numbers(graph: fx.Graph) -> tuple[dict[fx.Node, int], dict[int, fx.Node], set[fx.Node]]:
    """A number per node, equal for nodes that compute the same value; the first node
    (in graph order) of each number; and the nodes numbered through the coupling rule.

    Two calls number alike when they have the same target, constants and argument
    numbers; identities take their input's number; ``sub(add(a, b), c)`` takes ``a``'s
    number when ``c`` numbers as ``b`` (and ``b``'s when ``c`` numbers as ``a``) and the
    result is laid out as ``a`` (no broadcast, no type promotion). Random ops, ops that
    mutate, calls that are not aten ops and uninitialised allocations are never equal to
    another; a value an op mutates takes a new number for its later readers; tensor
    constants are equal only to themselves.
    """
    number: dict[fx.Node, int] = {}
    first: dict[int, fx.Node] = {}
    table: dict[Any, int] = {}
    sums: dict[int, tuple[int, int]] = {}
    coupled: set[fx.Node] = set()

    def key(value: object) -> object:
        if isinstance(value, fx.Node):
            return ("%", number[value])
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, *map(key, value))
        if isinstance(value, dict):
            return ("{", *sorted((k, key(v)) for k, v in value.items()))
        return (type(value).__name__, repr(value))

    def fresh(node: fx.Node) -> int:
        numbered = len(first)
        first[numbered] = node
        return numbered

    for node in graph.nodes:
        if node.op != "call_function" or _fresh_target(node):
            number[node] = fresh(node)
            schema = getattr(node.target, "_schema", None)
            for argument, value in zip(schema.arguments if schema else (), node.args):
                if (argument.alias_info is not None and argument.alias_info.is_write
                        and isinstance(value, fx.Node)):
                    number[value] = fresh(value)  # later readers see the mutated value
            continue
        if node.target in _IDENTITIES:
            number[node] = number[node.args[0]]
            continue
        if node.target is aten.sub.Tensor and not node.kwargs and all(
                isinstance(a, fx.Node) for a in node.args[:2]):
            parts = sums.get(number[node.args[0]])
            taken = number[node.args[1]]
            if parts is not None and taken in parts:
                kept = parts[1] if parts[0] == taken else parts[0]
                if _layout(first[kept]) == _layout(node):
                    number[node] = kept
                    coupled.add(node)
                    continue
        signature = (node.target, key(node.args), key(node.kwargs))
        if signature not in table:
            table[signature] = fresh(node)
            if node.target is aten.add.Tensor and not node.kwargs and all(
                    isinstance(a, fx.Node) for a in node.args[:2]):
                sums[table[signature]] = (number[node.args[0]], number[node.args[1]])
        number[node] = table[signature]
    return number, first, coupled


@dataclass(frozen=True)
class _Empty:
    dtype: torch.dtype
    device: torch.device


def _nothing(spec: object) -> object:
    """What a node of the rebuild holds under ``reversible.keep``: empty tensors, in
    its value's tuple structure (its getitems still unpack it)."""
    if isinstance(spec, tuple):
        return tuple(_nothing(s) for s in spec)
    if isinstance(spec, _Empty):
        return torch.empty(0, dtype=spec.dtype, device=spec.device)
    return spec


def _view_of_nothing(base: torch.Tensor, spec: object) -> object:
    """A view of an empty value of the rebuild: empty too."""
    return _nothing(spec)


def _spec(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return tuple(_spec(v) for v in value)
    if isinstance(value, torch.Tensor):
        return _Empty(value.dtype, value.device)
    return value


def _storages(node: fx.Node) -> set[StorageWeakRef]:
    return {StorageWeakRef(v.untyped_storage()) for v in tensors_in(node.meta.get("val"))}


def _is_view(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema) and not schema.is_mutable and any(
        r.alias_info is not None for r in schema.returns)


def _forward(graph: fx.Graph) -> set[fx.Node]:
    """The joint graph's forward nodes (graph.py's split: no tangent upstream)."""
    from monet.graph import _phases

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    tangents = [n for n in placeholders if n.name.startswith("tangents")]
    return _phases(graph, [n for n in placeholders if n not in tangents], tangents)[0]


def _needed(graph: fx.Graph, forward: set[fx.Node]) -> set[fx.Node]:
    """The forward nodes a forward output needs."""
    needed: set[fx.Node] = set()
    stack = [n for n in graph.output_node().all_input_nodes if n in forward]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack += [m for m in node.all_input_nodes if m in forward]
    return needed


def _may_rebuild(nodes) -> bool:
    """A rebuild subtracts: without an aten ``sub`` there is nothing to number."""
    return any(n.target is aten.sub.Tensor for n in nodes)


def _rebuilds(graph: fx.Graph, number: dict[fx.Node, int], first: dict[int, fx.Node],
              coupled: set[fx.Node], forward: set[fx.Node], needed: set[fx.Node]) -> bool:
    """Whether a block input is rebuilt from its outputs (a forward node no output needs,
    numbered through the coupling rule) and a backward node reads the rebuild."""
    unneeded = forward - needed
    if not coupled & unneeded:
        return False
    rebuilt = {n for n in unneeded if first[number[n]] is not n}
    return any(n not in forward and set(n.all_input_nodes) & rebuilt
               for n in graph.nodes if n.op == "call_function")


def _fake_value(node: fx.Node) -> object:
    """``node``'s value on its inputs' fake values: a view of their storages."""
    from torch._guards import detect_fake_mode

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda m: m.meta["val"])
    if node.target is operator.getitem:
        return node.target(*args)
    with detect_fake_mode([m.meta["val"] for m in node.all_input_nodes]):
        return node.target(*args, **kwargs)


def expose_twins(module: fx.GraphModule) -> int:
    """Give every view of the rebuild (a getitem, a transpose) a twin where the forward has
    none: the forward's layer norm saves no statistics and its attention no log-sum-exp
    (nothing read them), and the backward reads the rebuild's. The twin views the
    forward's value; nothing reads it in the captured step. Returns how many were added."""
    graph = module.graph
    if not _may_rebuild(graph.nodes):
        return 0
    number, first, coupled = value_numbers(graph)
    forward = _forward(graph)
    needed = _needed(graph, forward)
    if not _rebuilds(graph, number, first, coupled, forward, needed):
        return 0
    position = {n: k for k, n in enumerate(graph.nodes)}
    last_placeholder = max((n for n in graph.nodes if n.op == "placeholder"),
                           key=position.__getitem__, default=None)
    added = 0
    for node in list(graph.nodes):
        if node not in forward or node in needed or first[number[node]] is not node:
            continue
        inputs = node.all_input_nodes
        if not _is_view(node) or not inputs or all(first[number[m]] is m for m in inputs):
            continue
        twins = {m: first[number[m]] for m in inputs}
        anchor = max(twins.values(), key=position.__getitem__)
        if anchor.op == "placeholder":
            anchor = last_placeholder  # calls come after every placeholder
        with graph.inserting_after(anchor):
            copy = graph.node_copy(node, twins.__getitem__)
        copy.meta = {**node.meta, "val": _fake_value(copy)}
        position[copy] = position[anchor]
        first[number[node]] = copy
        number[copy] = number[node]
        forward.add(copy)
        added += 1
    if added:
        graph.lint()
        module.recompile()
    return added


def reversible_sites(order: list[fx.Node], forward: set[fx.Node]) -> list[Site]:
    """The ``reversible.keep`` site of a joint graph with a reversible rebuild, or none.

    ``order`` is monet's order of the joint graph's nodes and ``forward`` its forward
    nodes. The rebuild is every forward node no forward output needs whose value has
    an earlier twin; a site exists where one is a rebuilt block input (a ``sub``
    numbered through the rule), each node of the rebuild has a twin (see
    :func:`expose_twins`) and a backward node reads the rebuild.
    """
    calls = [n for n in order if n.op == "call_function"]
    if not _may_rebuild(calls):
        return []
    graph = calls[0].graph
    number, first, coupled = value_numbers(graph)
    needed = _needed(graph, forward)
    if not _rebuilds(graph, number, first, coupled, forward, needed):
        return []
    rebuilt = [n for n in calls if n in forward and n not in needed and first[number[n]] is not n]
    rebuilt_set = set(rebuilt)
    rewrites: list[Rewrite] = []
    for node in calls:
        if node in rebuilt_set or not set(node.all_input_nodes) & rebuilt_set:
            continue
        if node in forward:
            return []  # a forward node outside the rebuild reads it
        args, kwargs = fx.node.map_arg(
            (node.args, node.kwargs),
            lambda m: first[number[m]] if m in rebuilt_set else m)
        rewrites.append(Rewrite(node, node.target, args, kwargs))
    if not rewrites:
        return []
    # The rebuild's own values are never made; a view of a kept one (a parameter, the
    # stack's output) stays as it is: nothing reads it any more, and it costs nothing.
    made: set[StorageWeakRef] = set()
    drops = []
    for node in rebuilt:
        own = _storages(node) - {s for m in node.all_input_nodes for s in _storages(m)}
        made |= own
        if own:
            drops.append(node)
    owns = set(drops)
    for node in rebuilt:
        held = _storages(node)
        if node.target is operator.getitem or not held or not held <= made:
            continue
        spec = _spec(node.meta.get("val"))
        if node in owns:
            rewrites.append(Rewrite(node, _nothing, (spec,)))
        else:  # a view of the rebuild: it still reads its base, for whose bytes it stands
            rewrites.append(Rewrite(node, _view_of_nothing, (node.all_input_nodes[0], spec)))
    return [Site("reversible", (Alternative("reversible.keep", tuple(rewrites),
                                            drops=tuple(drops)),))]
