"""Activations kept for the backward in bfloat16 (lossy: only with ``lossy_variants``).

A float32 value the backward reads is kept whole from the forward to its
reader. Kept as a bfloat16 copy instead, it takes half the bytes; the
backward reads the copy, cast back to float32 inside the reader, so the
float32 value dies at the end of the forward (unless the forward or a
recomputation still reads it). Gradients then differ from eager's by
bfloat16's rounding of that value (8 bits of mantissa): a lossy variant, never
offered unless asked for, and named in the plan's report.

How it fits the program without a new kind of alternative: when lossy
variants are on, the joint graph gets a cast ``_to_copy(v, bfloat16)`` after
every such value ``v`` (:func:`insert_storage_casts`). Nothing reads a cast
in the captured graph, so the forward runs it only when a kept value needs it
(the solver's conditional forward ops). The alternative rewrites every
backward reader of ``v`` to read the cast instead (:func:`storage_sites`):
keeping the copy then replaces keeping ``v``, and the solver weighs its bytes,
the cast's time and the readers' cast back like any other choice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_unflatten

from monet.graph import tensors_in
from monet.operators import Alternative, Rewrite, Site

aten = torch.ops.aten

NAME = "storage.bfloat16"
CAST_OF = "monet_bfloat16_of"
"""Meta key of an inserted cast: the value it copies."""
READERS = "monet_bfloat16_readers"
"""Meta key of an inserted cast: the backward nodes that read the value."""
MIN_BYTES = 64 << 10
"""Values smaller than this (a norm's statistics) are not worth a choice of their own."""


def insert_storage_casts(module: fx.GraphModule, forward: set[fx.Node],
                         claimed: set[fx.Node] = frozenset()) -> list[fx.Node]:
    """Insert ``_to_copy(v, dtype=bfloat16)`` after float32 values ``v`` among the joint
    graph's ``forward`` nodes that backward nodes read, none of them in ``claimed``
    (rewritten by another variant) nor a reader of a larger such value, and that are
    neither views of an input nor in a storage the backward reads through another
    value; returns the casts. A graph that has them already (planned before) gets
    none more: its own come back."""
    graph = module.graph
    existing = [n for n in graph.nodes if CAST_OF in n.meta]
    if existing:
        return [n for n in existing if not set(n.meta[READERS]) & claimed]
    # A view of a parameter or input is live all step: a copy of it saves nothing.
    pinned = {
        StorageWeakRef(v.untyped_storage())
        for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")
        for v in tensors_in(n.meta.get("val"))
    }
    wanted: list[tuple[int, StorageWeakRef, fx.Node, list[fx.Node]]] = []
    for node in graph.nodes:
        if node not in forward:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            continue
        size, storage = value.numel() * value.element_size(), StorageWeakRef(
            value.untyped_storage())
        readers = [u for u in node.users if u.op == "call_function" and u not in forward]
        if size >= MIN_BYTES and storage not in pinned and readers:
            wanted.append((size, storage, node, readers))
    # A copy frees the float32 storage only if no other value in it (a view, a
    # detach) is read by the backward too.
    read_in = Counter(storage for _, storage, _, _ in wanted)
    # A reader of two such values (an attention backward reads q, k and v) is
    # rewritten for one of them only, the largest: each choice is one value's copy.
    taken = set(claimed)
    casts = []
    for _, storage, node, readers in sorted(wanted, key=lambda w: -w[0]):
        if read_in[storage] > 1 or taken & set(readers):
            continue
        taken |= set(readers)
        with graph.inserting_after(node):
            cast = graph.call_function(aten._to_copy.default, (node,),
                                       {"dtype": torch.bfloat16})
        cast.meta["val"] = _bfloat16_like(node.meta["val"])
        cast.meta[CAST_OF] = node
        cast.meta[READERS] = tuple(readers)
        casts.append(cast)
    if casts:
        graph.lint()
        module.recompile()
    return casts


def storage_sites(node: fx.Node) -> list[Site]:
    """At an inserted cast: the alternative whose backward reads the bfloat16 copy."""
    value = node.meta.get(CAST_OF)
    if value is None:
        return []
    rewrites = []
    for reader in node.meta[READERS]:
        args = fx.node.map_arg(reader.args, lambda n: node if n is value else n)
        kwargs = fx.node.map_arg(reader.kwargs, lambda n: node if n is value else n)
        leaves, _ = tree_flatten((args, kwargs))
        positions = tuple(k for k, leaf in enumerate(leaves) if leaf is node)
        rewrites.append(Rewrite(reader, reads_bfloat16(reader.target, positions), args,
                                kwargs))
    return [Site(node.name, (Alternative(NAME, tuple(rewrites), lossy=True),))]


def reads_bfloat16(target: Any, positions: tuple[int, ...]):
    """``target`` called with the arguments at ``positions`` (of the flattened
    ``(args, kwargs)``), bfloat16 copies, cast back to float32 first."""
    wanted = frozenset(positions)

    def bfloat16_read(*args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [leaf.float() if k in wanted else leaf for k, leaf in enumerate(leaves)]
        args, kwargs = tree_unflatten(leaves, spec)
        return target(*args, **kwargs)

    name = (str(target) if isinstance(target, torch._ops.OpOverload)
            else getattr(target, "__qualname__", None) or str(target))
    bfloat16_read.__qualname__ = f"bfloat16_read[{name}@{','.join(map(str, positions))}]"
    return bfloat16_read


def _bfloat16_like(value: torch.Tensor) -> torch.Tensor:
    """A bfloat16 tensor of ``value``'s shape and strides in a storage of its own: the
    traced value of the cast (a fake tensor under capture)."""
    mode = getattr(value, "fake_mode", None)
    if mode is not None:
        with mode:
            return torch.empty_strided(value.shape, value.stride(), dtype=torch.bfloat16,
                                       device=value.device)
    return torch.empty_strided(value.shape, value.stride(), dtype=torch.bfloat16,
                               device="meta")

