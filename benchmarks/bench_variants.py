"""pytest-benchmark suite: each operator variant against the op it replaces.

    python -m pytest benchmarks/bench_variants.py --benchmark-only [--benchmark-json out.json]

Per variant, on a shape of the models it serves: the default's and the
variant's time (pytest-benchmark's rounds) and peak memory of one call above
its inputs (``monet.measure.measure_peak_memory``, CPU: profiler allocator
events), in ``extra_info``. Not run by CI (``testpaths`` is ``tests``).
"""

from __future__ import annotations

import pytest
import torch

from monet.measure import measure_peak_memory
from monet.operators.conv import convolution_backward_native, convolution_native
from monet.operators.mlp import mlp_backward_chunked, mlp_weight_grad_recompute
from monet.operators.norms import batch_norm_backward_from_output, layer_norm_backward_from_output

aten = torch.ops.aten


def _layer_norm(shape=(8, 197, 384)):
    """ViT-S tokens: batch 8, 197 tokens, width 384."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w, b = 1 + 0.1 * torch.randn(shape[-1], generator=g), 0.1 * torch.randn(shape[-1], generator=g)
    out, mean, rstd = aten.native_layer_norm(x, [shape[-1]], w, b, 1e-6)
    grad, mask = torch.randn(shape, generator=g), [True, True, True]
    default = (aten.native_layer_norm_backward.default,
               (grad, x, [shape[-1]], mean, rstd, w, b, mask))
    variant = (layer_norm_backward_from_output, (grad, out, [shape[-1]], mean, rstd, w, b, mask))
    return default, variant


def _batch_norm(shape=(8, 64, 56, 56)):
    """A ResNet stage-1 activation: batch 8, 64 channels, 56x56."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    c = shape[1]
    w, b = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    out, mean, invstd, _, _ = aten._native_batch_norm_legit_functional(
        x, w, b, torch.zeros(c), torch.ones(c), True, 0.1, 1e-5)
    grad, mask = torch.randn(shape, generator=g), [True, True, True]
    default = (aten.native_batch_norm_backward.default,
               (grad, x, w, None, None, mean, invstd, True, 1e-5, mask))
    variant = (batch_norm_backward_from_output, (grad, out, w, b, mean, invstd, 1e-5, mask))
    return default, variant


def _convolution(shape=(8, 64, 56, 56), channels=64, kernel=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(channels, shape[1], kernel, kernel, generator=g) * 0.05
    args = (x, w, None, [1, 1], [kernel // 2] * 2, [1, 1], False, [0, 0], 1)
    return (aten.convolution.default, args), (convolution_native, args)


def _convolution_backward(shape=(8, 64, 56, 56), channels=64, kernel=3):
    (_, args), _ = _convolution(shape, channels, kernel)
    grad = torch.randn(shape[0], channels, *shape[2:])
    backward = (grad, args[0], args[1], [0], *args[3:], [True, True, False])
    return ((aten.convolution_backward.default, backward),
            (convolution_backward_native, backward))


def _mlp(tokens=8 * 197, width=384, hidden=1536):
    """ViT-S's MLP backward: the default (autograd's ops) reads the kept hidden values,
    the variant rebuilds them a chunk of tokens at a time."""
    g = torch.Generator().manual_seed(0)
    x2d = torch.randn(tokens, width, generator=g)
    w1t, b1 = torch.randn(width, hidden, generator=g) / width**0.5, torch.zeros(hidden)
    w2t = torch.randn(hidden, width, generator=g) / hidden**0.5
    a = torch.addmm(b1, x2d, w1t)
    mask = torch.rand(tokens, hidden, generator=g) > 0.1
    h = aten.gelu(a) * mask * (1 / 0.9)
    grad2d = torch.randn(tokens, width, generator=g)

    def default(grad2d, x2d, w1t, a, h, mask, w2t):
        grad_a = aten.gelu_backward(
            aten.native_dropout_backward(torch.mm(grad2d, w2t.t()), mask, 1 / 0.9), a)
        return (torch.mm(grad2d.t(), h), torch.mm(grad_a, w1t.t()), torch.mm(grad_a.t(), x2d),
                grad_a.sum(0, keepdim=True))

    def variant(grad2d, x2d, w1t, b1, w2t, factors):
        return (mlp_weight_grad_recompute(grad2d.t(), x2d, w1t, b1, "gelu", "none", factors),
                *mlp_backward_chunked(grad2d, x2d, w1t, b1, w2t, "gelu", "none", factors))

    return ((default, (grad2d, x2d, w1t, a, h, mask, w2t)),
            (variant, (grad2d, x2d, w1t, b1, w2t, [mask, 1 / 0.9])))


def _attention(shape=(8, 6, 197, 64), backward=True):
    """ViT-S's attention (batch 8, 6 heads, 197 tokens): the CPU flash kernel (what
    ``scaled_dot_product_attention`` captures; it keeps its log-sum-exp and rebuilds the
    probabilities in the backward) against the math path that keeps the N×N
    probabilities for its backward, the alternative a GPU's kernels would offer."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    scale = shape[-1] ** -0.5
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    grad = torch.randn(shape, generator=g)

    def math_forward(q, k, v):
        probabilities = torch.softmax((q * scale) @ k.transpose(-2, -1), -1)
        return probabilities @ v, probabilities

    def math_backward(grad, q, k, v, probabilities):
        grad_scores = aten._softmax_backward_data(
            grad @ v.transpose(-2, -1), probabilities, -1, q.dtype)
        return ((grad_scores @ k) * scale, (grad_scores.transpose(-2, -1) @ q) * scale,
                probabilities.transpose(-2, -1) @ grad)

    if not backward:
        return ((aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v)),
                (math_forward, (q, k, v)))
    probabilities = math_forward(q, k, v)[1]
    return ((aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
             (grad, q, k, v, out, lse, 0.0, False)),
            (math_backward, (grad, q, k, v, probabilities)))


CASES = {
    "attention keeping probabilities (forward)": lambda: _attention(backward=False),
    "attention keeping probabilities (backward)": _attention,
    "mlp.backward_chunked": _mlp,
    "layer_norm.backward_from_output": _layer_norm,
    "batch_norm.backward_from_output": _batch_norm,
    "convolution.native (forward)": _convolution,
    "convolution.native (backward)": _convolution_backward,
}


@pytest.mark.parametrize("which", ["default", "variant"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_variant(benchmark, case, which):
    default, variant = CASES[case]()
    function, args = default if which == "default" else variant
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    peak = measure_peak_memory(lambda: function(*args), tensors).peak_bytes
    resident = sum(t.untyped_storage().nbytes() for t in tensors)
    benchmark.extra_info.update(case=case, implementation=which,
                                bytes_above_inputs=peak - resident)
    benchmark.pedantic(function, args, rounds=7, iterations=1, warmup_rounds=1)
