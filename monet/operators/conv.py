"""Convolution implementations: the ones PyTorch offers on the device.

Same arguments, same results up to float rounding, different time and
workspace. On CPU the captured op runs oneDNN (mkldnn) where it applies; the
alternative is ATen's native path (im2col + GEMM, or the depthwise kernel).
On CUDA the captured op runs cuDNN with its heuristic algorithm; the
alternative lets cuDNN benchmark its algorithms and keep the fastest. Each is
profiled with its measured time and workspace, and the solver picks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from monet.operators import Alternative, Rewrite, Site

aten = torch.ops.aten


@contextlib.contextmanager
def mkldnn_enabled(enabled: bool):
    # torch.backends.mkldnn.flags also resets TF32 settings (and warns); only
    # the switch that picks the implementation is wanted here.
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def convolution_native(*args):
    """``aten.convolution`` through ATen's native CPU kernels instead of oneDNN."""
    with mkldnn_enabled(False):
        return aten.convolution.default(*args)


def convolution_backward_native(*args):
    """``aten.convolution_backward`` through ATen's native CPU kernels instead of oneDNN."""
    with mkldnn_enabled(False):
        return aten.convolution_backward.default(*args)


def _cudnn_benchmark():
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=True, benchmark=True, deterministic=cudnn.deterministic,
                       allow_tf32=cudnn.allow_tf32)


def convolution_cudnn_benchmark(*args):
    """``aten.convolution`` with cuDNN's benchmarked algorithm."""
    with _cudnn_benchmark():
        return aten.convolution.default(*args)


def convolution_backward_cudnn_benchmark(*args):
    """``aten.convolution_backward`` with cuDNN's benchmarked algorithms."""
    with _cudnn_benchmark():
        return aten.convolution_backward.default(*args)


_IMPLEMENTATIONS = {
    ("cpu", aten.convolution.default): ("convolution.native", convolution_native),
    ("cpu", aten.convolution_backward.default): (
        "convolution.native", convolution_backward_native),
    ("cuda", aten.convolution.default): (
        "convolution.cudnn_benchmark", convolution_cudnn_benchmark),
    ("cuda", aten.convolution_backward.default): (
        "convolution.cudnn_benchmark", convolution_backward_cudnn_benchmark),
}


def _device_type(node: fx.Node) -> str | None:
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    return value.device.type if isinstance(value, torch.Tensor) else None


def convolution_sites(node: fx.Node) -> list[Site]:
    """Each convolution and convolution backward node may run another implementation."""
    found = _IMPLEMENTATIONS.get((_device_type(node), node.target))
    if found is None:
        return []
    transposed = node.args[6] if node.target is aten.convolution.default else node.args[7]
    if transposed:
        return []  # transposed convolutions: keep the captured path
    name, target = found
    rewrite = Rewrite(node, target, tuple(node.args), dict(node.kwargs))
    forward = node.target is aten.convolution.default
    return [Site(node.name, (Alternative(name, (rewrite,), forward_rounding=forward),))]
