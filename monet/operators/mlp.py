"""An MLP's backward that recomputes its wide hidden value a chunk of tokens at a time.

In ``fc2(act(fc1(x)))`` the backward reads two values four times as wide as
the block: the pre-activation ``a = fc1(x)`` (for the activation's backward)
and the hidden ``h = act(a)`` (for fc2's weight gradient). Keeping them is
most of a transformer block's activation memory; recomputing them with
checkpointing brings both back whole. The variant rewrites those two
backward nodes to read ``x`` (kept anyway: fc1's weight gradient reads it)
and rebuild ``a`` and ``h`` for a quarter of the tokens at a time, so the
hidden is never whole in the backward, at the cost of running fc1 twice more.
Dropout between the activation and fc2 is replayed from its kept mask.

Results equal aten's up to float rounding: a matrix product over a chunk of
rows, and a weight gradient summed over chunks, round differently.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from monet.operators import Alternative, Rewrite, Site

aten = torch.ops.aten

CHUNKS = 4
"""Token chunks: the backward holds a quarter of the hidden value at a time."""

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_ACTIVATIONS = {
    aten.gelu_backward.default: aten.gelu.default,
    aten.silu_backward.default: aten.silu.default,
}


def _rows(count: int, chunks: int):
    step = max(1, math.ceil(count / chunks))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _pre_activation(x2d, weight_t, bias, rows):
    """``fc1`` on some rows, as aten's ``addmm``/``mm`` computes it."""
    if bias is None:
        return torch.mm(x2d[rows], weight_t)
    return torch.addmm(bias, x2d[rows], weight_t)


def _activate(a, activation: str, approximate: str):
    if activation == "gelu":
        return aten.gelu.default(a, approximate=approximate)
    return aten.silu.default(a)


def _hidden(a, activation, approximate, factors, width, rows):
    """``h`` on some rows: the activation, then the factors (dropout's mask and scale),
    multiplied in place so that a chunk holds two temporaries at most."""
    h = _activate(a, activation, approximate)
    for factor in factors:
        h.mul_(factor.reshape(-1, width)[rows] if isinstance(factor, torch.Tensor) else factor)
    return h


def mlp_weight_grad_recompute(
    grad_t: torch.Tensor,
    x2d: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    approximate: str,
    factors: list,
    chunks: int = CHUNKS,
) -> torch.Tensor:
    """``grad_t @ h`` (fc2's weight gradient) with ``h`` rebuilt from ``x`` chunk by chunk."""
    width = weight_t.shape[1]
    out = None
    for rows in _rows(x2d.shape[0], chunks):
        h = _hidden(_pre_activation(x2d, weight_t, bias, rows), activation, approximate,
                    factors, width, rows)
        if out is None:
            out = torch.mm(grad_t[:, rows], h)
        else:
            out.addmm_(grad_t[:, rows], h)
    return out


def activation_backward_recompute(
    grad: torch.Tensor,
    x2d: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    approximate: str,
    chunks: int = CHUNKS,
) -> torch.Tensor:
    """The activation's backward with its input ``a = fc1(x)`` rebuilt chunk by chunk."""
    width = weight_t.shape[1]
    flat = grad.reshape(-1, width)
    out = torch.empty_like(flat, memory_format=torch.contiguous_format)
    for rows in _rows(x2d.shape[0], chunks):
        a = _pre_activation(x2d, weight_t, bias, rows)
        # The out= overloads write each chunk in place: no chunk-sized copy.
        if activation == "gelu":
            aten.gelu_backward.grad_input(flat[rows], a, approximate=approximate,
                                          grad_input=out[rows])
        else:
            aten.silu_backward.grad_input(flat[rows], a, grad_input=out[rows])
    return out.view(grad.shape)


def _source(node: object) -> object:
    """``node`` through reshaping views."""
    while isinstance(node, fx.Node) and node.target in _VIEWS:
        node = node.args[0]
    return node


def _fc1(node: object):
    """(x2d, weight_t, bias) when ``node`` is ``addmm(bias, x2d, weight_t)`` or ``mm(x2d, weight_t)``."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    if node.target is aten.addmm.default and len(node.args) == 3:
        bias, x2d, weight_t = node.args
    elif node.target is aten.mm.default:
        (x2d, weight_t), bias = node.args, None
    else:
        return None
    shapes = [getattr(n, "meta", {}).get("val") for n in (x2d, weight_t)]
    if any(not isinstance(s, torch.Tensor) or s.dim() != 2 for s in shapes):
        return None
    if bias is not None and bias.meta["val"].dim() != 1:
        return None
    return x2d, weight_t, bias


def _to_fc2(start: fx.Node, depends):
    """Follow ``start`` (the activation) through multiplies to the 2-D view fc2 reads.

    Returns (factors, h2d) or None. A factor is a number or a tensor that does
    not depend on the MLP's hidden value (``depends``).
    """
    factors, node = [], start
    while True:
        # empty_like (dropout's mask is drawn on a tensor like its input) reads no values.
        users = [u for u in node.users if u.target is not aten.empty_like.default]
        if len(users) != 1:
            return None
        user = users[0]
        if user.target is aten.mul.Tensor and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, fx.Node):
                value = other.meta.get("val")
                if (not isinstance(value, torch.Tensor) or depends(other)
                        or value.shape != node.meta["val"].shape):
                    return None
            elif not isinstance(other, (int, float)):
                return None
            factors.append(other)
            node = user
            continue
        if user.target in _VIEWS and user.meta["val"].dim() == 2:
            return factors, user
        return None


def mlp_sites(node: fx.Node) -> list[Site]:
    forward_activation = _ACTIVATIONS.get(node.target)
    if forward_activation is None:
        return []
    grad, a = node.args[:2]
    approximate = node.kwargs.get("approximate", node.args[2] if len(node.args) > 2 else "none")
    fc1_node = _source(a)
    fc1 = _fc1(fc1_node)
    if fc1 is None or a.meta["val"].numel() != fc1_node.meta["val"].numel():
        return []
    x2d, weight_t, bias = fc1
    activations = [u for u in a.users if u.target is forward_activation]
    if len(activations) != 1:
        return []
    act = activations[0]
    if forward_activation is aten.gelu.default and act.kwargs.get(
        "approximate", act.args[1] if len(act.args) > 1 else "none"
    ) != approximate:
        return []
    hidden_nodes = {fc1_node, a, act}

    def depends(other: fx.Node) -> bool:
        return any(m in hidden_nodes for m in other.all_input_nodes) or other in hidden_nodes

    found = _to_fc2(act, depends)
    if found is None:
        return []
    factors, h2d = found
    # h2d feeds fc2 and fc2's weight gradient, ``mm(t(grad), h2d)``; nothing else.
    weight_grads = [u for u in h2d.users if u.target is aten.mm.default and u.args[1] is h2d]
    if len(weight_grads) != 1 or len(h2d.users) != 2:
        return []
    fc2 = next(u for u in h2d.users if u is not weight_grads[0])
    if _fc1(fc2) is None or _fc1(fc2)[0] is not h2d:
        return []
    weight_grad = weight_grads[0]
    name = "gelu" if forward_activation is aten.gelu.default else "silu"
    rewrites = (
        Rewrite(weight_grad, mlp_weight_grad_recompute,
                (weight_grad.args[0], x2d, weight_t, bias, name, approximate, factors)),
        Rewrite(node, activation_backward_recompute,
                (grad, x2d, weight_t, bias, name, approximate)),
    )
    return [Site(node.name, (Alternative("mlp.backward_recompute_hidden", rewrites),))]
