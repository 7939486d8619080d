"""A max-pool's backward from its indices alone.

``max_pool2d_with_indices_backward`` takes the pool's input but reads only its
shape and the memory format it suggests: the gradient goes where the indices
say. Given an uninitialised tensor of that shape and format instead, it returns
the captured op's result bit for bit (``tests/operators``), and the input need
not live until the pool's backward. On Hiera (SAM2) the pooled query is a view
of the fused q/k/v projection, so the whole projection was held past the
attention's backward for it. No choice: with variants on, every such backward
runs so; the stand-in is workspace, measured by the profile like any other.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._prims_common import suggest_memory_format

aten = torch.ops.aten


def max_pool_backward_from_indices(grad_output, like, kernel_size, stride, padding, dilation,
                                   ceil_mode, indices):
    """``max_pool2d_with_indices_backward`` with a stand-in for its input: ``like`` is
    (shape, dtype, device, memory format) of the pool's input."""
    shape, dtype, device, memory_format = like
    stand_in = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return aten.max_pool2d_with_indices_backward(
        grad_output, stand_in, kernel_size, stride, padding, dilation, ceil_mode, indices)


def pool_backwards_from_indices(module: fx.GraphModule) -> int:
    """Rewrite every max-pool backward of a joint graph to read no pool input; returns
    how many."""
    count = 0
    for node in module.graph.nodes:
        if (node.op != "call_function"
                or node.target is not aten.max_pool2d_with_indices_backward.default
                or node.kwargs or len(node.args) != 8):
            continue
        value = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        like = (tuple(value.shape), value.dtype, value.device, suggest_memory_format(value))
        node.target = max_pool_backward_from_indices
        node.args = (node.args[0], like, *node.args[2:])
        count += 1
    if count:
        module.graph.lint()
        module.recompile()
    return count
