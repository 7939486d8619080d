"""The chunked written-out attention against autograd through the written-out ops."""

from __future__ import annotations

import pytest
import torch

from monet.operators.attention import (
    attention_backward_chunked,
    attention_forward_chunked,
    attention_values_backward_chunked,
)


def _reference(queries, keys_t, values, bias_h, bias_w):
    """The ops MViTv2 writes out: logits, the decomposed bias, softmax, product with V."""
    logits = torch.bmm(queries, keys_t)
    if bias_h is not None:
        batch, heads = bias_h.shape[:2]
        bias = (bias_h.unsqueeze(5) + bias_w.unsqueeze(4)).reshape(
            batch, heads, logits.shape[1], logits.shape[2])
        logits = (logits.view(batch, heads, *logits.shape[1:]) + bias).view(logits.shape)
    return torch.bmm(logits.softmax(-1), values)


# (batch, heads, query grid, key grid, head width, value width): odd sizes, batch 1, a
# query grid shorter than the chunk count, one head.
SHAPES = [
    (1, 1, (3, 5), (2, 3), 4, 4),
    (2, 3, (7, 4), (7, 4), 8, 8),
    (1, 2, (11, 9), (3, 3), 5, 7),
    (3, 1, (1, 6), (2, 5), 3, 2),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunks", [1, 3, 8, None])
def test_chunked_attention_matches_the_written_out_ops(shape, with_bias, chunks):
    batch, heads, (qh, qw), (kh, kw), width, value_width = shape
    generator = torch.Generator().manual_seed(qh * 100 + kh * 10 + width)
    tokens, keys = qh * qw, kh * kw

    def leaf(*size):
        return torch.randn(*size, generator=generator).requires_grad_()

    queries = leaf(batch * heads, tokens, width)
    keys_t = leaf(batch * heads, width, keys)
    values = leaf(batch * heads, keys, value_width)
    bias_h = leaf(batch, heads, qh, qw, kh) if with_bias else None
    bias_w = leaf(batch, heads, qh, qw, kw) if with_bias else None
    leaves = [t for t in (values, queries, keys_t, bias_h, bias_w) if t is not None]
    out = _reference(queries, keys_t, values, bias_h, bias_w)
    grad = torch.randn(out.shape, generator=generator)
    expected = torch.autograd.grad(out, leaves, grad)

    with torch.no_grad():
        chunked = attention_forward_chunked(queries, keys_t, values, bias_h, bias_w, chunks)
        grads = (
            *attention_values_backward_chunked(grad, queries, keys_t, values, bias_h, bias_w,
                                               chunks),
            *attention_backward_chunked(grad, queries, keys_t, values, bias_h, bias_w,
                                        torch.float32, chunks),
        )
    torch.testing.assert_close(chunked, out, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(expected)
    for actual, wanted in zip(grads, expected, strict=True):
        assert actual.shape == wanted.shape and actual.dtype == wanted.dtype
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
