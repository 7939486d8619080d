"""A max-pool's backward from its indices alone.

``max_pool2d_with_indices_backward`` takes the pool's input but reads only its
shape and the memory format it suggests: the gradient goes where the indices
say. Given an uninitialised tensor of that shape and format instead, it returns
the captured op's result bit for bit (``tests/operators``), and the input need
not live until the pool's backward. On Hiera (SAM2) the pooled query is a view
of the fused q/k/v projection, so the whole projection was held past the
attention's backward for it. The stand-in is workspace of the input's size, so
this is a choice: where the input is live anyway at the pool's backward (a
ResNet's stem, whose ReLU's backward reads the same value later) the captured
op costs nothing and the stand-in would add the input's bytes at that step.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._prims_common import suggest_memory_format

from monet.operators import Alternative, Rewrite, Site

aten = torch.ops.aten

FROM_INDICES = "max_pool.backward_from_indices"


def max_pool_backward_from_indices(grad_output, like, kernel_size, stride, padding, dilation,
                                   ceil_mode, indices):
    """``max_pool2d_with_indices_backward`` with a stand-in for its input: ``like`` is
    (shape, dtype, device, memory format) of the pool's input."""
    shape, dtype, device, memory_format = like
    stand_in = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return aten.max_pool2d_with_indices_backward(
        grad_output, stand_in, kernel_size, stride, padding, dilation, ceil_mode, indices)


def max_pool_sites(node: fx.Node) -> list[Site]:
    """A max-pool backward that reads the gradient and the indices, not the pool's input."""
    if (node.op != "call_function"
            or node.target is not aten.max_pool2d_with_indices_backward.default
            or node.kwargs or len(node.args) != 8):
        return []
    value = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return []
    like = (tuple(value.shape), value.dtype, value.device, suggest_memory_format(value))
    rewrite = Rewrite(node, max_pool_backward_from_indices, (node.args[0], like, *node.args[2:]))
    return [Site(node.name, (Alternative(FROM_INDICES, (rewrite,)),))]
