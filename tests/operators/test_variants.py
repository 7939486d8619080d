"""Every operator variant against the default implementation: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch

from monet.operators import VariantRefused
from monet.operators.conv import convolution_backward_native, convolution_native
from monet.operators.inplace import _IDEMPOTENT, activate_in_place, write_into
from monet.operators.inplace import _OUT as IN_PLACE
from monet.operators.norms import (
    batch_norm_backward_from_output,
    batch_norm_backward_from_output_in_place,
    batch_norm_backward_in_place,
    layer_norm_backward_from_output,
    layer_norm_backward_from_output_in_place,
    layer_norm_backward_in_place,
    layer_norm_backward_recomputed_stats,
)

aten = torch.ops.aten


def close(actual, expected, rtol=1e-4, atol=1e-5):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert a.shape == e.shape and a.dtype == e.dtype
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def affine(shape, generator):
    # Weights near 1 (as initialised and trained), never exactly zero.
    weight = 1 + 0.3 * torch.randn(shape, generator=generator)
    return weight, 0.3 * torch.randn(shape, generator=generator)


@pytest.mark.parametrize("shape", [(1, 5), (2, 7, 33), (1, 1, 16), (3, 4, 2, 9)])
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("affine_kind", ["both", "weight", "none"])
def test_layer_norm_backward_from_output(shape, mask, affine_kind):
    generator = torch.Generator().manual_seed(sum(shape))
    normalized = list(shape[-1:]) if len(shape) < 4 else list(shape[-2:])
    x = 3 * torch.randn(shape, generator=generator) + 1
    weight, bias = affine(normalized, generator)
    weight = None if affine_kind == "none" else weight
    bias = None if affine_kind != "both" else bias
    out, mean, rstd = aten.native_layer_norm(x, normalized, weight, bias, 1e-5)
    grad = torch.randn(shape, generator=generator)
    # Autograd asks for the gradients of the affine parameters that exist.
    mask = [mask[0], mask[1] and weight is not None, mask[2] and bias is not None]
    expected = aten.native_layer_norm_backward(grad, x, normalized, mean, rstd, weight, bias, mask)
    actual = layer_norm_backward_from_output(grad, out, normalized, mean, rstd, weight, bias,
                                             mask)
    close(actual, expected)


@pytest.mark.parametrize("shape", [(1, 5), (2, 7, 33), (1, 1, 16), (3, 4, 2, 9)])
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("affine_kind", ["both", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_backward_recomputed_stats(shape, mask, affine_kind, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    normalized = list(shape[-1:]) if len(shape) < 4 else list(shape[-2:])
    x = (3 * torch.randn(shape, generator=generator) + 1).to(dtype)
    weight, bias = (p.to(dtype) for p in affine(normalized, generator))
    weight = None if affine_kind == "none" else weight
    bias = None if affine_kind != "both" else bias
    _, mean, rstd = aten.native_layer_norm(x, normalized, weight, bias, 1e-5)
    grad = torch.randn(shape, generator=generator).to(dtype)
    mask = [mask[0], mask[1] and weight is not None, mask[2] and bias is not None]
    expected = aten.native_layer_norm_backward(grad, x, normalized, mean, rstd, weight, bias, mask)
    actual = layer_norm_backward_recomputed_stats(grad, x, normalized, 1e-5, weight, bias, mask,
                                                  mean.dtype)
    if dtype == torch.float32:
        close(actual, expected)
    else:  # the statistics round to bfloat16's 8 bits differently, at most by an ulp
        close(actual, expected, rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (4, 8, 7, 3), (2, 5, 11), (3, 6)])
@pytest.mark.parametrize("with_affine", [True, False])
def test_batch_norm_backward_from_output(shape, with_affine):
    generator = torch.Generator().manual_seed(sum(shape))
    x = 2 * torch.randn(shape, generator=generator) - 1
    weight, bias = affine(shape[1], generator) if with_affine else (None, None)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    out, save_mean, save_invstd, _, _ = aten._native_batch_norm_legit_functional(
        x, weight, bias, running_mean, running_var, True, 0.1, 1e-5
    )
    grad = torch.randn(shape, generator=generator)
    mask = [True, with_affine, with_affine]
    expected = aten.native_batch_norm_backward(
        grad, x, weight, running_mean, running_var, save_mean, save_invstd, True, 1e-5, mask
    )
    actual = batch_norm_backward_from_output(grad, out, weight, bias, save_mean, save_invstd,
                                             1e-5, mask)
    close(actual, expected)


@pytest.mark.parametrize(("shape", "channels_last"), [
    ((1, 3, 5, 5), False), ((4, 8, 7, 3), False), ((2, 5, 11), False), ((3, 6), False),
    ((1, 2, 1, 1), False), ((1, 3, 5, 5), True), ((4, 8, 7, 3), True),
])
@pytest.mark.parametrize("with_affine", [True, False])
@pytest.mark.parametrize("from_output", [False, True])
def test_batch_norm_backward_in_place(shape, channels_last, with_affine, from_output):
    """The input gradient equals aten's and lands in the incoming gradient's storage,
    with no temporary of its size."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(sum(shape))
    x = 2 * torch.randn(shape, generator=generator) - 1
    grad = torch.randn(shape, generator=generator)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    weight, bias = affine(shape[1], generator) if with_affine else (None, None)
    out, save_mean, save_invstd, _, _ = aten._native_batch_norm_legit_functional(
        x, weight, bias, torch.zeros(shape[1]), torch.ones(shape[1]), True, 0.1, 1e-5
    )
    mask = [True, with_affine, with_affine]
    expected = aten.native_batch_norm_backward(
        grad, x, weight, None, None, save_mean, save_invstd, True, 1e-5, mask
    )
    overwritten = grad.clone()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if from_output:
            actual = batch_norm_backward_from_output_in_place(
                overwritten, out, weight, bias, save_mean, save_invstd, 1e-5, mask)
        else:
            actual = batch_norm_backward_in_place(
                overwritten, x, weight, save_mean, save_invstd, 1e-5, mask)
    close(actual, expected)
    assert actual[0] is overwritten and actual[0].stride() == expected[0].stride()
    largest = max((e.nbytes() for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]"), default=0)
    if grad.numel() > 4 * shape[1]:
        assert largest < grad.numel() * grad.element_size()


@pytest.mark.parametrize(("shape", "normalized", "permuted"), [
    ((1, 5), 1, False), ((2, 7, 33), 1, False), ((1, 50, 16), 1, False), ((3, 4, 2, 9), 2, False),
    ((2, 6, 5, 9), 1, True), ((1, 8, 8, 24), 1, True),
])
@pytest.mark.parametrize("affine_kind", ["both", "weight", "none"])
@pytest.mark.parametrize("from_output", [False, True])
def test_layer_norm_backward_in_place(shape, normalized, permuted, affine_kind, from_output):
    """The input gradient lands in the incoming gradient's storage (bit for bit aten's when
    read from the input), with no temporary of its size, also for a permuted input."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(sum(shape))
    x = 3 * torch.randn(shape, generator=generator) + 1
    if permuted:  # a channels-last norm of an NCHW value, as ConvNeXt's
        x = x.permute(0, 2, 1, 3)
    normalized = list(x.shape[-normalized:])
    weight, bias = affine(normalized, generator)
    weight = None if affine_kind == "none" else weight
    bias = None if affine_kind != "both" else bias
    out, mean, rstd = aten.native_layer_norm(x, normalized, weight, bias, 1e-5)
    grad = torch.randn(out.shape, generator=generator)
    mask = [True, weight is not None, bias is not None]
    expected = aten.native_layer_norm_backward(grad, x, normalized, mean, rstd, weight, bias,
                                               mask)
    overwritten = grad.clone()
    run = layer_norm_backward_from_output_in_place if from_output else layer_norm_backward_in_place
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        actual = run(overwritten, out if from_output else x, normalized, mean, rstd, weight,
                     bias, mask)
    close(actual, expected)
    assert actual[0] is overwritten
    if not from_output:
        assert torch.equal(actual[0], expected[0])
    largest = max((e.nbytes() for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]"), default=0)
    if grad.numel() >= 8 * 64:
        assert largest <= grad.nbytes / 4


def test_layer_norm_backward_in_place_in_bfloat16():
    """The parameter gradients are summed over slabs in float32: within bfloat16's
    rounding of the exact (float64) gradients, as aten's are (here aten's err more).
    (Rebuilt from a bfloat16 output, the input carries that output's rounding: the
    from-output variants are for float32 and autocast's float32 norms.)"""
    generator = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(4, 50, 64, generator=generator) + 1).bfloat16()
    weight, bias = (t.bfloat16() for t in affine([64], generator))
    out, mean, rstd = aten.native_layer_norm(x, [64], weight, bias, 1e-5)
    grad = torch.randn(out.shape, generator=generator).bfloat16()
    exact = aten.native_layer_norm_backward(
        *(t.double() for t in (grad, x)), [64], *(t.double() for t in (mean, rstd, weight, bias)),
        [True, True, True])
    aten_error = [
        (e.double() - x).abs().max().item() for e, x in zip(aten.native_layer_norm_backward(
            grad, x, [64], mean, rstd, weight, bias, [True, True, True]), exact, strict=True)]
    actual = layer_norm_backward_in_place(grad.clone(), x, [64], mean, rstd, weight, bias,
                                          [True, True, True])
    for value, reference, theirs in zip(actual, exact, aten_error, strict=True):
        assert value.dtype == torch.bfloat16
        error = (value.double() - reference).abs().max().item()
        assert error <= max(theirs, 2 ** -7 * reference.abs().max().item())


def test_zero_weights_are_refused_not_inverted():
    x = torch.randn(2, 3, 4)
    weight, bias = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.zeros(4)
    out, mean, rstd = aten.native_layer_norm(x, [4], weight, bias, 1e-5)
    with pytest.raises(VariantRefused, match="exact zeros"):
        layer_norm_backward_from_output(torch.ones_like(x), out, [4], mean, rstd, weight, bias,
                                        [True, True, True])
    with pytest.raises(VariantRefused, match="exact zeros"):
        layer_norm_backward_from_output_in_place(torch.ones_like(x), out, [4], mean, rstd,
                                                 weight, bias, [True, True, True])
    y = torch.randn(2, 3, 5, 5)
    with pytest.raises(VariantRefused, match="exact zeros"):
        batch_norm_backward_from_output(y, y, torch.tensor([0.0, 1.0, 1.0]), None,
                                        torch.zeros(3), torch.ones(3), 1e-5, [True, True, True])
    with pytest.raises(VariantRefused, match="exact zeros"):
        batch_norm_backward_from_output_in_place(
            y, y, torch.tensor([0.0, 1.0, 1.0]), None, torch.zeros(3), torch.ones(3), 1e-5,
            [True, True, True])


@pytest.mark.parametrize(
    ("shape", "channels", "kernel", "stride", "padding", "groups"),
    [
        ((1, 3, 9, 9), 5, 3, 1, 1, 1),
        ((2, 4, 7, 11), 6, (2, 3), 2, 0, 2),
        ((2, 6, 8, 8), 6, 7, 1, 3, 6),  # depthwise, as in ConvNeXt
        ((1, 3, 16, 16), 8, 4, 4, 0, 1),  # patchify, as in ViT stems
    ],
)
def test_native_convolution_equals_default(shape, channels, kernel, stride, padding, groups):
    generator = torch.Generator().manual_seed(channels)
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(channels, shape[1] // groups, *kernel, generator=generator)
    bias = torch.randn(channels, generator=generator)
    args = (x, weight, bias, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups)
    expected = aten.convolution.default(*args)
    actual = convolution_native(*args)
    close([actual], [expected])
    grad = torch.randn(expected.shape, generator=generator)
    backward_args = (grad, x, weight, [channels], *args[3:], [True, True, True])
    close(convolution_backward_native(*backward_args),
          aten.convolution_backward.default(*backward_args))
    assert torch._C._get_mkldnn_enabled()  # the switch is restored


@pytest.mark.parametrize("tokens,width,hidden,out", [(1, 4, 16, 4), (17, 8, 33, 5), (40, 12, 48, 12)])
@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu", "tanh"),
                                                    ("silu", "none")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
def test_mlp_backward_chunked(tokens, width, hidden, out, activation, approximate, bias,
                              dropout):
    """Against autograd through ``fc2(dropout(act(fc1(x))))``: fc2's weight gradient
    (as ``Gᵀh``), the input's, fc1's weight's (as ``(W1ᵀ)ᵀ``'s) and the bias's."""
    from monet.operators.mlp import mlp_backward_chunked, mlp_weight_grad_recompute

    generator = torch.Generator().manual_seed(tokens + hidden)
    x2d = torch.randn(tokens, width, generator=generator, requires_grad=True)
    weight_t = (torch.randn(width, hidden, generator=generator) / width**0.5).requires_grad_()
    b = torch.randn(hidden, generator=generator).requires_grad_() if bias else None
    fc2_weight_t = torch.randn(hidden, out, generator=generator) / hidden**0.5
    h = torch.addmm(b, x2d, weight_t) if bias else torch.mm(x2d, weight_t)
    h = aten.gelu(h, approximate=approximate) if activation == "gelu" else aten.silu(h)
    factors = []
    if dropout:
        mask = torch.rand(tokens, hidden, generator=generator) > 0.3
        factors = [mask, 1 / 0.7]
        h = h * mask * (1 / 0.7)
    h.retain_grad()
    grad2d = torch.randn(tokens, out, generator=generator)
    torch.mm(h, fc2_weight_t).backward(grad2d)
    expected = [x2d.grad, weight_t.grad.t()] + ([b.grad.view(1, hidden)] if bias else [])
    with torch.no_grad():
        for chunks in (None, 1, 3, 8, tokens + 2):
            actual = mlp_backward_chunked(grad2d, x2d, weight_t, b, fc2_weight_t, activation,
                                          approximate, factors, chunks)
            close(actual, expected)
            close([mlp_weight_grad_recompute(grad2d.t(), x2d, weight_t, b, activation,
                                             approximate, factors, chunks)],
                  [torch.mm(grad2d.t(), h.detach())])


@pytest.mark.parametrize("tokens,width,hidden,out", [(1, 4, 16, 4), (5, 8, 33, 5), (17, 8, 33, 5),
                                                    (40, 12, 48, 12)])
@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu", "tanh"),
                                                    ("silu", "none")])
@pytest.mark.parametrize("biases", [(True, True), (False, False), (True, False)])
def test_mlp_forward_chunked(tokens, width, hidden, out, activation, approximate, biases):
    """Against the captured ops ``fc2(act(fc1(x)))`` on 2-D views: fc2's output; one chunk
    is bit for bit."""
    from monet.operators.mlp import mlp_forward_chunked

    generator = torch.Generator().manual_seed(tokens + hidden)
    x2d = torch.randn(tokens, width, generator=generator)
    weight_t = torch.randn(width, hidden, generator=generator) / width**0.5
    fc2_weight_t = torch.randn(hidden, out, generator=generator) / hidden**0.5
    b, fc2_b = (torch.randn(n, generator=generator) if on else None
                for n, on in zip((hidden, out), biases, strict=True))
    a = torch.mm(x2d, weight_t) if b is None else torch.addmm(b, x2d, weight_t)
    h = aten.gelu(a, approximate=approximate) if activation == "gelu" else aten.silu(a)
    expected = torch.mm(h, fc2_weight_t) if fc2_b is None else torch.addmm(fc2_b, h, fc2_weight_t)
    for chunks in (None, 1, 3, 8, tokens + 2):
        actual = mlp_forward_chunked(x2d, weight_t, b, fc2_weight_t, fc2_b, activation,
                                     approximate, chunks)
        close([actual], [expected])
        if chunks in (None, 1):  # by default a small MLP runs in one chunk
            assert torch.equal(actual, expected)


def test_mlp_chunks_follow_the_hidden_values_size():
    """Near ``CHUNK_BYTES`` of hidden values per chunk, one at least, ``CHUNKS`` at most;
    the chunks cover every row once."""
    from monet.operators.mlp import CHUNK_BYTES, CHUNKS, _rows

    def count(tokens, hidden, chunks=None):
        rows = _rows(tokens, hidden, 4, chunks)
        assert [r.start for r in rows] == [0, *(r.stop for r in rows[:-1])]
        assert rows[-1].stop == tokens
        return len(rows)

    assert count(294, 3072) == 1  # ConvNeXt-T's last stage at batch 6: 3.4 MiB
    assert count(1176, 1536) == 2
    assert count(18816, 384) == 7
    assert count(10 * CHUNK_BYTES // 4, 1) == CHUNKS
    assert count(1, 16) == 1
    assert count(100, 16, chunks=3) == 3  # an explicit count is kept


@pytest.mark.parametrize("shape", [(1, 5), (2, 7, 33), (1, 1, 16), (3, 4, 2, 9)])
@pytest.mark.parametrize("op", ["gelu", "mm", "native_layer_norm_backward"])
def test_a_backward_reading_a_bfloat16_copy(shape, op):
    """``storage.bfloat16`` (lossy): the reader gets the kept copy cast back to float32,
    so it computes exactly the default on the value rounded to bfloat16, and within
    bfloat16's rounding of the default itself."""
    from torch.utils._pytree import tree_flatten

    from monet.operators.storage import reads_bfloat16

    generator = torch.Generator().manual_seed(len(shape) + len(op))
    value = torch.randn(shape, generator=generator)
    grad = torch.randn(shape, generator=generator)
    if op == "gelu":
        target, args, kwargs = aten.gelu_backward.default, (grad, value), {"approximate": "tanh"}
    elif op == "mm":
        value, grad = value.reshape(-1, shape[-1]), grad.reshape(-1, shape[-1])
        target, args, kwargs = aten.mm.default, (value.t(), grad), {}
        value = args[0]
    else:
        normalized = shape[-1:]
        weight, bias = affine(normalized, generator)
        _, mean, rstd = aten.native_layer_norm.default(value, normalized, weight, bias, 1e-5)
        target = aten.native_layer_norm_backward.default
        args, kwargs = (grad, value, normalized, mean, rstd, weight, bias, [True, True, True]), {}
    copy = value.to(torch.bfloat16)
    swapped = tuple(copy if a is value else a for a in args)
    leaves, _ = tree_flatten((swapped, kwargs))
    positions = tuple(k for k, leaf in enumerate(leaves) if leaf is copy)
    assert len(positions) == 1
    actual = reads_bfloat16(target, positions)(*swapped, **kwargs)
    rounded = target(*(copy.float() if a is copy else a for a in swapped), **kwargs)
    default = target(*args, **kwargs)
    as_tuple = (lambda r: tuple(r) if isinstance(r, (tuple, list)) else (r,))
    close(as_tuple(actual), as_tuple(rounded), rtol=0, atol=0)
    # bfloat16 keeps 8 bits of mantissa: a relative error of 2**-8 per element at most.
    for a, e in zip(as_tuple(actual), as_tuple(default), strict=True):
        if e is not None:
            assert (a - e).norm() <= 2 ** -7 * e.norm() + 1e-6


@pytest.mark.parametrize("op", sorted(IN_PLACE))
def test_pointwise_backward_written_in_place(op):
    """Each listed op, written over each argument it may overwrite: the captured op's
    result bit for bit, in that argument's storage, with nothing of its size allocated
    (an out= overload generated from the functional op would allocate and copy)."""
    from torch.profiler import ProfilerActivity, profile

    _, name, overload = op.split(".")
    target = getattr(getattr(aten, name), overload)
    _, _, positions = IN_PLACE[op]
    generator = torch.Generator().manual_seed(len(op))
    a, b = (torch.randn(3, 5, 7, generator=generator) for _ in range(2))
    extra = {
        "aten.threshold_backward.default": (0.0,),
        "aten.leaky_relu_backward.default": (0.01, False),
        "aten._softmax_backward_data.default": (-1, torch.float32),
        "aten._log_softmax_backward_data.default": (1, torch.float32),
    }.get(op, ())
    if "softmax" in op:
        b = (b.log_softmax if "log" in op else b.softmax)(extra[0])
    args = (a, b.sigmoid() if "sigmoid" in op or "tanh" in op else b, *extra)
    expected = target(*args)
    for position in positions:
        written = list(args)
        written[position] = args[position].clone()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            actual = write_into(op, position, *written)
        assert actual is written[position]
        assert torch.equal(actual, expected)
        largest = max((e.nbytes() for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"), default=0)
        assert largest < a.numel() * a.element_size()


@pytest.mark.parametrize("op", sorted(_IDEMPOTENT))
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 9), (1, 1, 4, 4)])
def test_forward_activation_written_in_place(op, shape):
    """The captured activation's result bit for bit, in its input's storage, and the same
    again when run over that result (a recomputation from an overwritten, kept input)."""
    _, name, overload = op.split(".")
    target = getattr(getattr(aten, name), overload)
    extra = (-0.5, 2.0) if "hardtanh" in op else ()
    x = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    expected = target(x, *extra)
    written = x.clone()
    actual = activate_in_place(op, written, *extra)
    assert actual is written and torch.equal(actual, expected)
    assert torch.equal(activate_in_place(op, actual, *extra), expected)


@pytest.mark.parametrize("shape", [(1, 3, 9, 11), (2, 5, 8, 8), (4, 1, 7, 5)])
@pytest.mark.parametrize("window", [(2, 2, 0, 1, False), (3, 2, 1, 1, False),
                                    (3, 1, 1, 1, False), (2, 2, 0, 1, True), (3, 2, 1, 2, False)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs CUDA"))])
def test_max_pool_backward_from_indices(shape, window, channels_last, device):
    """Without the pool's input (an uninitialised stand-in of its shape and format), the
    captured backward's result bit for bit and laid out as it, overlapping windows
    (several gradients summed into one input) included."""
    from torch._prims_common import suggest_memory_format

    from monet.operators.pooling import max_pool_backward_from_indices

    kernel, stride, padding, dilation, ceil_mode = window
    generator = torch.Generator().manual_seed(sum(shape) + kernel)
    x = torch.randn(shape, generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sizes = ([kernel] * 2, [stride] * 2, [padding] * 2, [dilation] * 2, ceil_mode)
    out, indices = aten.max_pool2d_with_indices(x, *sizes)
    grad = torch.randn(out.shape, generator=generator).to(device)
    expected = aten.max_pool2d_with_indices_backward(grad, x, *sizes, indices)
    like = (tuple(x.shape), x.dtype, x.device, suggest_memory_format(x))
    actual = max_pool_backward_from_indices(grad, like, *sizes, indices)
    if device == "cpu":
        assert torch.equal(actual, expected)
    else:  # CUDA's kernel may sum overlapping windows' gradients in another order
        torch.testing.assert_close(actual, expected)
    assert actual.stride() == expected.stride()


def test_a_max_pool_backward_may_read_no_pool_input():
    """With variants, a max-pool's backward may read the gradient and the indices only, so
    the pool's input is free after its last other reader, at the cost of a stand-in of
    the input's size: a choice of the solver's, never forced."""
    from torch import nn

    import monet
    from monet.operators.pooling import FROM_INDICES

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(2, 3, 8, 8)
    captured = monet.optimize(model, 1.0, (x,), measure=False, variants=False).last_plan
    assert not captured.problem.choices
    problem = monet.optimize(model, 1.0, (x,), measure=False).last_plan.problem
    pool = next(i for i, n in enumerate(problem.nodes) if n.op.startswith("aten.max_pool2d"))
    pool_input = problem.nodes[pool].inputs[0]
    (backward,) = (i for i, n in enumerate(problem.nodes)
                   if "max_pool" in n.op and n.phase == "backward")
    assert pool_input in problem.nodes[backward].inputs
    (site,) = (c for c in problem.choices if c.alternatives[-1].name == FROM_INDICES)
    (override,) = site.alternatives[-1].overrides
    assert override.node == backward and pool_input not in override.inputs
    stand_in = sum(problem.storage_bytes[s] for s in problem.nodes[pool_input].storages)
    assert override.workspace >= stand_in
