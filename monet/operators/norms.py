"""Norm backwards that read the norm's output instead of its input.

A norm's backward needs the normalised input ``x̂``; autograd keeps the input
``x`` (and the statistics) to rebuild it. The norm's output ``y = x̂·w + b``
is usually kept anyway (the next linear or convolution reads it for its
weight gradient), and ``x = ((y − b) / w) / rstd + mean`` is exact up to
rounding when no weight is zero; the variant rebuilds it (the workspace of
one input) and runs aten's own backward. Reading ``y`` lets the solver drop ``x`` for free: in a
pre-norm transformer that is the residual stream, twice per block (MONeT's
"output-activated" norm, in-place ABN's inversion, for layer norm too).

A layer norm's backward may instead compute the mean and inverse deviation
again from the input (``layer_norm.backward_recomputed_stats``): the forward's
statistics, two values per row, need not be kept. A batch norm's are two per
channel, a few hundred bytes: not offered there.

A weight with an exact zero cannot be inverted: the function refuses it
(:class:`VariantRefused`), so profiling does not offer the variant, and a run
whose weights became zero later stops with that error rather than a wrong
gradient.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from monet.operators import Alternative, Rewrite, Site, VariantRefused, overwritable

aten = torch.ops.aten


def _check_invertible(weight: torch.Tensor | None, what: str) -> None:
    if weight is not None and bool((weight == 0).any()):
        raise VariantRefused(
            f"{what}: the weight has exact zeros, so its output cannot be inverted; "
            "optimize with variants=False or re-plan"
        )


def _input_from_output(out, weight, bias, mean, scale_inverse, shape=None):
    """``x = ((y − b) / w) / rstd + mean``: two passes over ``y``, then aten's own backward.

    Under autocast the norm may run in half precision with float32 parameters:
    the input is rebuilt in float32 and returned in the output's dtype.
    """
    work = torch.promote_types(out.dtype, torch.float32)
    view = (lambda t: t.to(work)) if shape is None else (lambda t: t.to(work).view(shape))
    y = out.to(work)
    if weight is not None:
        inverse = view(weight).reciprocal()
        shift = -view(bias) * inverse if bias is not None else torch.zeros_like(inverse)
        x_hat = torch.addcmul(shift, y, inverse)
    else:
        x_hat = y if bias is None else y - view(bias)
    # A multiply by the (per-row) standard deviation: addcdiv's broadcast is 7x slower.
    return torch.addcmul(mean.to(work), x_hat, scale_inverse.to(work).reciprocal()).to(out.dtype)


def layer_norm_backward_from_output(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    normalized_shape: list[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``aten.native_layer_norm_backward`` given the output ``y`` instead of the input."""
    _check_invertible(weight, "layer norm backward from its output")
    x = _input_from_output(out, weight, bias, mean, rstd)
    return aten.native_layer_norm_backward.default(
        grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask
    )


def layer_norm_backward_recomputed_stats(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    normalized_shape: list[int],
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: list[bool],
    stats_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``aten.native_layer_norm_backward`` with the mean and inverse deviation computed
    again from the input (one pass over it), so the forward's need not be kept.

    The statistics take the dtype aten's forward gives them on this device (float32 for
    a bfloat16 input with float32 weights under CPU autocast, where the traced graph
    says bfloat16): that of a one-row forward, else ``stats_dtype``."""
    batch = inp.dim() - len(normalized_shape)
    dims = tuple(range(batch, inp.dim()))
    if inp.numel():
        row = inp[(slice(0, 1),) * batch]
        stats_dtype = aten.native_layer_norm.default(row, normalized_shape, weight, bias,
                                                     eps)[1].dtype
    work = torch.promote_types(inp.dtype, torch.float32)
    var, mean = torch.var_mean(inp.to(work), dims, correction=0, keepdim=True)
    rstd = var.add_(eps).rsqrt_()
    return aten.native_layer_norm_backward.default(
        grad_out, inp, normalized_shape, mean.to(stats_dtype), rstd.to(stats_dtype), weight,
        bias, output_mask,
    )


def batch_norm_backward_from_output(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Training-mode ``aten.native_batch_norm_backward`` given the output instead of the input."""
    _check_invertible(weight, "batch norm backward from its output")
    shape = [1, out.shape[1]] + [1] * (out.dim() - 2)
    x = _input_from_output(
        out, weight, bias, save_mean.view(shape), save_invstd.view(shape), shape
    )
    return aten.native_batch_norm_backward.default(
        grad_out, x, weight, None, None, save_mean, save_invstd, True, eps, output_mask
    )


def _channel_sums(grad_out, value, mean, invstd, eps):
    """Per channel ``Σ dy·(v − mean)·invstd`` and ``Σ dy``, with no tensor of ``dy``'s size:
    they are aten's batch-norm weight and bias gradients, asked for without the input's."""
    _, weighted, total = aten.native_batch_norm_backward.default(
        grad_out, value, None, None, None, mean, invstd, True, eps, [False, True, True]
    )
    return weighted, total


def _overwrite(grad_out, scale, value, slope, shift):
    """``dy ← scale·dy + slope·v + shift`` per channel, in ``dy``'s own storage."""
    shape = [1, grad_out.shape[1]] + [1] * (grad_out.dim() - 2)
    return grad_out.mul_(scale.view(shape)).addcmul_(value, slope.view(shape)).add_(
        shift.view(shape)
    )


def batch_norm_backward_in_place(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Training-mode batch-norm backward that writes the input gradient over ``grad_out``.

    ``dx = k·(dy − Σdy/M − x̂·Σdy·x̂/M)`` with ``k = w·invstd`` is, per channel,
    ``a·dy + b·x + c``: one reduction (aten's, without the input gradient), then
    three in-place passes. The caller's ``grad_out`` is gone afterwards; the
    lowering uses this only where nothing reads it later.
    """
    gx_hat, g_bias = _channel_sums(grad_out, inp, save_mean, save_invstd, eps)
    count = grad_out.numel() // grad_out.shape[1]
    k = save_invstd if weight is None else weight * save_invstd
    slope = -k * save_invstd * gx_hat / count
    shift = k * (save_mean * save_invstd * gx_hat - g_bias) / count
    grad_in = _overwrite(grad_out, k, inp, slope, shift)
    return _masked(output_mask, grad_in, gx_hat, g_bias)


def batch_norm_backward_from_output_in_place(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`batch_norm_backward_in_place` given the output ``y = x̂·w + b`` instead of
    the input: ``x̂ = (y − b)/w`` is affine in ``y`` per channel, so nothing is rebuilt."""
    _check_invertible(weight, "batch norm backward from its output")
    g_y, g_bias = _channel_sums(
        grad_out, out, torch.zeros_like(save_mean), torch.ones_like(save_invstd), eps
    )
    w = torch.ones_like(save_invstd) if weight is None else weight
    b = torch.zeros_like(save_mean) if bias is None else bias
    gx_hat = (g_y - b * g_bias) / w
    count = grad_out.numel() // grad_out.shape[1]
    k = w * save_invstd
    slope = -k * gx_hat / (count * w)
    shift = k * (b * gx_hat / w - g_bias) / count
    grad_in = _overwrite(grad_out, k, out, slope, shift)
    return _masked(output_mask, grad_in, gx_hat, g_bias)


LAYER_NORM_CHUNKS = 8
"""Row slabs of an in-place layer-norm backward: its workspace is one slab's."""


def _slabs(batch: tuple[int, ...], chunks: int) -> list[tuple[object, ...]]:
    """Indexes over the leading (row) dims that split them into about ``chunks`` slabs,
    each a plain view: a dim is sliced whole-index by whole-index until the slabs are
    small enough, so a permuted input is never copied whole."""
    if not batch or chunks <= 1:
        return [()]
    first, rest = batch[0], batch[1:]
    if first >= chunks or not rest:
        step = max(1, math.ceil(first / chunks))
        return [(slice(i, min(i + step, first)),) for i in range(0, first, step)]
    inner = _slabs(rest, math.ceil(chunks / first))
    return [(i, *index) for i in range(first) for index in inner]


def _layer_norm_backward_into(grad_out, rebuild, normalized_shape, mean, rstd, weight,
                              bias, output_mask):
    """aten's layer-norm backward a slab of rows at a time, each slab's input gradient
    copied over its rows of ``grad_out`` (rows are independent: the input gradient is
    aten's, bit for bit; the parameter gradients are summed over slabs)."""
    batch = tuple(grad_out.shape[: grad_out.dim() - len(normalized_shape)])
    if grad_out.numel() == 0:
        return aten.native_layer_norm_backward.default(
            grad_out, rebuild(()), normalized_shape, mean, rstd, weight, bias, output_mask)
    wanted = [True, output_mask[1] and weight is not None, output_mask[2] and bias is not None]
    sums: list[torch.Tensor | None] = [None, None, None]
    for index in _slabs(batch, LAYER_NORM_CHUNKS):
        grad = grad_out[index]
        part = aten.native_layer_norm_backward.default(
            grad, rebuild(index), normalized_shape, mean[index], rstd[index], weight, bias,
            wanted,
        )
        grad.copy_(part[0])
        for k in (1, 2):
            if wanted[k]:
                # Summed in float32, as aten's one reduction is, whatever the dtype.
                part_sum = part[k].to(torch.promote_types(part[k].dtype, torch.float32))
                sums[k] = part_sum if sums[k] is None else sums[k].add_(part_sum)
    parameters = (None, weight, bias)
    return _masked(output_mask, grad_out, *(
        None if sums[k] is None else sums[k].to(parameters[k].dtype) for k in (1, 2)))


def layer_norm_backward_in_place(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    normalized_shape: list[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Layer-norm backward that writes the input gradient over ``grad_out`` (contiguous),
    an eighth of the rows at a time: it never holds a second tensor of that size."""
    return _layer_norm_backward_into(grad_out, lambda index: inp[index], normalized_shape,
                                     mean, rstd, weight, bias, output_mask)


def layer_norm_backward_from_output_in_place(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    normalized_shape: list[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`layer_norm_backward_in_place` given the output: each slab's input is
    rebuilt from its rows of the output, so the rebuild's workspace is a slab too."""
    _check_invertible(weight, "layer norm backward from its output")
    return _layer_norm_backward_into(
        grad_out,
        lambda index: _input_from_output(out[index], weight, bias, mean[index], rstd[index]),
        normalized_shape, mean, rstd, weight, bias, output_mask,
    )


def _masked(mask, *values):
    return tuple(v if wanted else None for v, wanted in zip(values, mask, strict=True))


def _getitem_of(node: object, index: int) -> fx.Node | None:
    """The tuple-producing node whose ``index``-th item ``node`` is."""
    if (
        isinstance(node, fx.Node)
        and node.target is operator.getitem
        and node.args[1] == index
        and isinstance(node.args[0], fx.Node)
    ):
        return node.args[0]
    return None


def _item(node: fx.Node, index: int) -> fx.Node | None:
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def layer_norm_sites(node: fx.Node) -> list[Site]:
    if node.target is not aten.native_layer_norm_backward.default:
        return []
    grad_out, inp, normalized_shape, mean, rstd, weight, bias, output_mask = node.args
    forward = _getitem_of(rstd, 2)
    if (
        forward is None
        or forward.target is not aten.native_layer_norm.default
        or _getitem_of(mean, 1) is not forward
        or forward.args[0] is not inp
        or forward.args[2] is not weight
        or forward.args[3] is not bias
    ):
        return []
    out = _item(forward, 0)
    if out is None or math.prod(normalized_shape) == 0:
        return []
    rewrite = Rewrite(
        node,
        layer_norm_backward_from_output,
        (grad_out, out, normalized_shape, mean, rstd, weight, bias, output_mask),
    )
    alternatives = [Alternative("layer_norm.backward_from_output", (rewrite,))]
    stats = mean.meta.get("val") if isinstance(mean, fx.Node) else None
    if isinstance(stats, torch.Tensor) and len(forward.args) == 5:
        alternatives.append(Alternative("layer_norm.backward_recomputed_stats", (Rewrite(
            node, layer_norm_backward_recomputed_stats,
            (grad_out, inp, normalized_shape, forward.args[4], weight, bias, output_mask,
             stats.dtype),
        ),)))
    # overwritable() has checked that grad_out is a node holding a dense tensor.
    if (output_mask[0] and overwritable(grad_out, node)
            and grad_out.meta["val"].is_contiguous()):
        alternatives += [
            Alternative("layer_norm.backward_in_place", (Rewrite(
                node, layer_norm_backward_in_place,
                (grad_out, inp, normalized_shape, mean, rstd, weight, bias, output_mask),
                overwrites=grad_out,
            ),)),
            Alternative("layer_norm.backward_from_output_in_place", (Rewrite(
                node, layer_norm_backward_from_output_in_place,
                (grad_out, out, normalized_shape, mean, rstd, weight, bias, output_mask),
                overwrites=grad_out,
            ),)),
        ]
    return [Site(node.name, tuple(alternatives))]


_BATCH_NORMS = (
    aten._native_batch_norm_legit_functional.default,
    aten._native_batch_norm_legit.default,
    aten.native_batch_norm.default,
)


def batch_norm_sites(node: fx.Node) -> list[Site]:
    if node.target is not aten.native_batch_norm_backward.default:
        return []
    grad_out, inp, weight, _, _, save_mean, save_invstd, train, eps, output_mask = node.args
    forward = _getitem_of(save_invstd, 2)
    if (
        not train
        or forward is None
        or forward.target not in _BATCH_NORMS
        or _getitem_of(save_mean, 1) is not forward
        or forward.args[0] is not inp
        or forward.args[1] is not weight
    ):
        return []
    out = _item(forward, 0)
    if out is None:
        return []
    bias = forward.args[2]
    rewrite = Rewrite(
        node,
        batch_norm_backward_from_output,
        (grad_out, out, weight, bias, save_mean, save_invstd, eps, output_mask),
    )
    alternatives = [Alternative("batch_norm.backward_from_output", (rewrite,))]
    if output_mask[0] and overwritable(grad_out, node):
        alternatives += [
            Alternative("batch_norm.backward_in_place", (Rewrite(
                node, batch_norm_backward_in_place,
                (grad_out, inp, weight, save_mean, save_invstd, eps, output_mask),
                overwrites=grad_out,
            ),)),
            Alternative("batch_norm.backward_from_output_in_place", (Rewrite(
                node, batch_norm_backward_from_output_in_place,
                (grad_out, out, weight, bias, save_mean, save_invstd, eps, output_mask),
                overwrites=grad_out,
            ),)),
        ]
    return [Site(node.name, tuple(alternatives))]
