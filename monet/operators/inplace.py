"""Pointwise backward ops that write over a gradient dying with them.

An activation's backward (``threshold_backward``, ``gelu_backward``, …) or a
sum or product of gradients whose gradient input has no later reader writes
its result into that input: aten's ``out=`` overload with the input as the
output, which TensorIterator's kernels allow when the output is exactly one of
their inputs. The result is the captured op's bit for bit and the step never
holds both tensors, so it is no choice: with variants on, ``graph.analyse``
counts the output in the input's storage and ``lower`` runs the overload.
Profiling times the captured op, which allocates its output: a little slower,
never faster.

Only kernels whose ``out=`` overload is structured (computes into ``out``
itself) are listed: an overload generated from the functional op allocates
its result and copies it (``tests/operators`` checks each by its allocations).

A softmax's backward (``y·(g − Σ g·y)`` for output ``y`` and incoming gradient
``g``, summed along the softmax's dimension) is not pointwise, but its CPU
kernel reads a whole row's sum before it writes any of that row, so writing over
the incoming gradient gives its result bit for bit; on an attention's N×N
probabilities that is one N×N value fewer in the backward. The CUDA kernels are
not checked here, so only CPU values are written over.

A forward ReLU (or hardtanh) likewise writes over its input when nothing reads
that input's storage after it, neither the graph nor any variant: a residual
sum's or a linear layer's output (their backwards read their inputs); not a
batch norm's, which the norm's backward from its output reads (see
``graph._overwritten_forward``). The problem then counts the activation as a
view of its input: keeping either keeps the one storage, and recomputing the
activation from a kept input runs it on its own output, which gives that
output again (both ops are idempotent). It drops one value at every run of
the activation, in the forward and in a recomputation.
"""

from __future__ import annotations

import torch
from torch import fx

from monet.operators import Rewrite, overwritable

aten = torch.ops.aten

# Captured op → its out= overload, the out argument's name and the positions of the
# tensor arguments it may write over.
_OUT: dict[str, tuple[torch._ops.OpOverload, str, tuple[int, ...]]] = {
    str(op): (out, name, positions)
    for op, out, name, positions in (
        (aten.threshold_backward.default, aten.threshold_backward.grad_input, "grad_input", (0,)),
        (aten.gelu_backward.default, aten.gelu_backward.grad_input, "grad_input", (0,)),
        (aten.silu_backward.default, aten.silu_backward.grad_input, "grad_input", (0,)),
        (aten.sigmoid_backward.default, aten.sigmoid_backward.grad_input, "grad_input", (0,)),
        (aten.tanh_backward.default, aten.tanh_backward.grad_input, "grad_input", (0,)),
        (aten.leaky_relu_backward.default, aten.leaky_relu_backward.grad_input, "grad_input",
         (0,)),
        (aten.add.Tensor, aten.add.out, "out", (0, 1)),
        (aten.sub.Tensor, aten.sub.out, "out", (0, 1)),
        (aten.mul.Tensor, aten.mul.out, "out", (0, 1)),
        (aten.div.Tensor, aten.div.out, "out", (0, 1)),
        (aten._softmax_backward_data.default, aten._softmax_backward_data.out, "grad_input",
         (0,)),
        (aten._log_softmax_backward_data.default, aten._log_softmax_backward_data.out, "out",
         (0,)),
    )
}
_CPU_ONLY = {str(aten._softmax_backward_data.default),
             str(aten._log_softmax_backward_data.default)}


def write_into(op: str, position: int, *args, **kwargs):
    """Run the aten op named ``op`` with its output written over ``args[position]``."""
    out, name, _ = _OUT[op]
    return out(*args, **kwargs, **{name: args[position]})


def in_place_rewrites(order: list[fx.Node], forward: set[fx.Node],
                      claimed: set[fx.Node]) -> list[Rewrite]:
    """A rewrite for every backward pointwise op (not ``claimed`` by a variant) that may
    write over one of its tensor arguments: a backward value it alone reads, laid out
    as its output. ``graph.analyse`` keeps those whose argument's storage dies there."""
    rewrites = []
    for node in order:
        if node.op != "call_function" or node in forward or node in claimed:
            continue
        entry = _OUT.get(str(node.target))
        if entry is None:
            continue
        for position in entry[2]:
            value = node.args[position] if position < len(node.args) else None
            if str(node.target) in _CPU_ONLY and not _on_cpu(value):
                continue
            if value not in forward and overwritable(value, node):
                rewrites.append(Rewrite(node, write_into, (str(node.target), position, *node.args),
                                        dict(node.kwargs), overwrites=value))
                break
    return rewrites


def _on_cpu(value: object) -> bool:
    held = value.meta.get("val") if isinstance(value, fx.Node) else None
    return isinstance(held, torch.Tensor) and held.device.type == "cpu"



# Forward activations whose in-place form, run again on its own output, gives that
# output (what recomputing one from a kept, overwritten input does).
_IDEMPOTENT = {str(op): in_place for op, in_place in (
    (aten.relu.default, aten.relu_.default),
    (aten.hardtanh.default, aten.hardtanh_.default),
)}


def activate_in_place(op: str, *args, **kwargs):
    """Run the forward activation named ``op`` over its input (``args[0]``).

    A plain function, not the mutating aten op: torch's partitioner keeps every
    mutating op in the forward, and a recomputation runs it in the backward."""
    return _IDEMPOTENT[op](*args, **kwargs)


def forward_in_place_rewrites(order: list[fx.Node], forward: set[fx.Node],
                              claimed: set[fx.Node]) -> list[Rewrite]:
    """A rewrite for every forward ReLU or hardtanh (not ``claimed`` by a variant) that may
    write over its input: a forward value it alone reads, laid out as its output.
    ``graph.analyse`` keeps those whose input's storage nothing else reads later."""
    rewrites = []
    for node in order:
        if (node.op != "call_function" or str(node.target) not in _IDEMPOTENT
                or node not in forward or node in claimed):
            continue
        value = node.args[0]
        if value in forward and overwritable(value, node):
            rewrites.append(Rewrite(node, activate_in_place, (str(node.target), *node.args),
                                    dict(node.kwargs), overwrites=value))
    return rewrites
