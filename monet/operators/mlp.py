"""An MLP's backward that recomputes its wide hidden value a chunk of tokens at a time.

In ``fc2(act(fc1(x)))`` the backward reads two values four times as wide as
the block: the pre-activation ``a = fc1(x)`` (for the activation's backward)
and the hidden ``h = act(a)`` (for fc2's weight gradient), and makes two
more of that width (the gradients of ``h`` and ``a``). Keeping ``a`` and
``h`` is most of a transformer block's activation memory; recomputing them
with checkpointing brings all four back whole at once.

fc1's gradients (input, weight, bias), which all read the gradient of ``a``,
are first fused into one node that runs the captured ops
(:func:`fuse_mlp_backwards`, bit for bit the unfused graph); the ops before it
(fc2's input gradient, dropout's and the activation's backward) stay as
captured, so that every schedule of the captured ops has its equal (one that
recomputes ``a`` just before the activation's backward, or ``x`` just before
fc1's weight gradient). The variant rewrites fc2's weight gradient and the
fused node to read ``x`` (kept anyway: fc1's weight gradient reads it) and
fc2's output gradient instead of ``a`` and ``h``:
:func:`mlp_weight_grad_recompute` rebuilds ``h``, and
:func:`mlp_backward_chunked` ``a`` and the gradients, a chunk of the tokens
at a time; the ops before it make nothing (empty values, the problem's
``drops``). So no full-width value exists in the backward, for two more runs
of fc1. Dropout between the activation and fc2 is replayed from its kept mask.

Without dropout a second variant, ``mlp.chunked``, runs the forward a chunk
at a time as well: fc2 computes its output from ``x`` (:func:`mlp_forward_chunked`),
and fc1, the activation and their views hold empty tensors, so ``a`` and
``h`` are never whole, not even for a moment (the problem's ``drops``).

Results equal aten's up to float rounding: a matrix product over a chunk of
rows, and a weight gradient summed over chunks, round differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from monet.operators import Alternative, Rewrite, Site, unmade
from monet.operators.fusion import feeds_a_discrete_op, fuse, only_read_inside

aten = torch.ops.aten

CHUNKS = 8
"""At most this many token chunks: the backward holds an eighth of the hidden width's
values at a time."""
CHUNK_BYTES = 4 << 20
"""About this many bytes of the hidden width's values per chunk: a small MLP runs in fewer
chunks, as products over a few rows cost more than they save. ConvNeXt-T's last stage at
batch 6 (294 tokens, 768 → 3072; 3.4 MiB hidden), this machine, both backward functions:
one chunk 55.5 ms, eight 95.9; its third stage (1,176 tokens, 6.9 MiB): two 52.6, eight
65.4; its first (18,816 tokens, 27.6 MiB): seven or eight alike (76-77)."""

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_ACTIVATIONS = {
    aten.gelu_backward.default: aten.gelu.default,
    aten.silu_backward.default: aten.silu.default,
}


def chunk_count(count: int, width: int, itemsize: int) -> int:
    """Chunks of ``count`` rows ``width`` wide: as many as keep each near ``CHUNK_BYTES``,
    at most ``CHUNKS``."""
    return min(CHUNKS, max(1, round(count * width * itemsize / CHUNK_BYTES)))


def _rows(count: int, width: int, itemsize: int, chunks: int | None):
    """Row slices of ``count`` rows ``width`` wide: ``chunks`` of them (None: by
    :func:`chunk_count`)."""
    if chunks is None:
        chunks = chunk_count(count, width, itemsize)
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
        if user.target is aten.clone.default and len(user.args) == 1:
            node = user  # nn.Dropout(0.0) in training: a copy, no factor
            continue
        if user.target in _VIEWS and user.meta["val"].dim() == 2:
            return factors, user
        return None


@dataclass(frozen=True)
class _Match:
    """The pieces of one MLP in the joint graph (``fc2(act(fc1(x)))``)."""

    backward: fx.Node
    """The activation's backward."""
    grad: fx.Node
    """What it reads as the gradient of ``act``'s output."""
    a: fx.Node
    x2d: fx.Node
    weight_t: fx.Node
    bias: fx.Node | None
    factors: list
    fc2_weight_t: fx.Node
    weight_grad: fx.Node
    """fc2's weight gradient, ``mm(t(G), h2d)``."""
    activation: str
    approximate: str


def _t_of(node: object) -> object:
    """``x`` when ``node`` is ``aten.t(x)``."""
    if isinstance(node, fx.Node) and node.target is aten.t.default:
        return node.args[0]
    return None


def _match(node: fx.Node) -> _Match | None:
    """The MLP whose activation backward is ``node``, or None."""
    forward_activation = _ACTIVATIONS.get(node.target)
    if forward_activation is None:
        return None
    grad, a = node.args[:2]
    approximate = node.kwargs.get("approximate", node.args[2] if len(node.args) > 2 else "none")
    fc1_node = _source(a)
    fc1 = _fc1(fc1_node)
    if fc1 is None or a.meta["val"].numel() != fc1_node.meta["val"].numel():
        return None
    x2d, weight_t, bias = fc1
    activations = [u for u in a.users if u.target is forward_activation]
    if len(activations) != 1:
        return None
    act = activations[0]
    if forward_activation is aten.gelu.default and act.kwargs.get(
        "approximate", act.args[1] if len(act.args) > 1 else "none"
    ) != approximate:
        return None
    hidden_nodes = {fc1_node, a, act}

    def depends(other: fx.Node) -> bool:
        return any(m in hidden_nodes for m in other.all_input_nodes) or other in hidden_nodes

    found = _to_fc2(act, depends)
    if found is None:
        return None
    factors, h2d = found
    # h2d feeds fc2 and fc2's weight gradient, ``mm(t(grad), h2d)``; nothing else.
    weight_grads = [u for u in h2d.users if u.target is aten.mm.default and u.args[1] is h2d]
    if len(weight_grads) != 1 or len(h2d.users) != 2:
        return None
    fc2 = _fc1(next(u for u in h2d.users if u is not weight_grads[0]))
    if fc2 is None or fc2[0] is not h2d:
        return None
    return _Match(
        backward=node, grad=grad, a=a, x2d=x2d, weight_t=weight_t, bias=bias,
        factors=factors, fc2_weight_t=fc2[1], weight_grad=weight_grads[0],
        activation="gelu" if forward_activation is aten.gelu.default else "silu",
        approximate=approximate,
    )


# ---------------------------------------------------------------------------
# The backward: fc1's gradients fused into one node, so that a variant may compute
# them a chunk of tokens at a time and hold no full-width gradient either.


def _backward_nodes(m: _Match):
    """The backward nodes from fc2's output gradient to fc1's gradients, or None:
    (the nodes up to ``a``'s 2-D gradient, fc1's gradients' nodes, those gradients,
    fc2's output gradient).

    Autograd's formulas for ``addmm``/``mm`` and ``native_dropout`` give:
    ``mm(G, t(w2t))`` → (view) → [``native_dropout_backward``] → the activation's
    backward → (view) → ``mm(·, t(w1t))``, ``mm(t(·), x2d)``, [``sum(·, [0], True)``],
    and fc2's weight gradient ``mm(t(G), h2d)``.
    """
    transposed_grad = m.weight_grad.args[0]
    grad2d = _t_of(transposed_grad)
    if grad2d is None:
        return None
    grad = m.grad
    # fc2's weight gradient stays its own node, so the default frees ``h`` as early
    # as the captured graph does; the variant rewrites it separately.
    hidden: list[fx.Node] = []
    if m.factors:
        if (len(m.factors) != 2 or not isinstance(m.factors[0], fx.Node)
                or not isinstance(m.factors[1], (int, float))):
            return None
        if (grad.target is not aten.native_dropout_backward.default
                or grad.args[1] is not m.factors[0] or grad.args[2] != m.factors[1]):
            return None
        hidden.append(grad)
        grad = grad.args[0]
    product = grad
    if product.target in _VIEWS:
        hidden.append(product)
        product = product.args[0]
    if (product.target is not aten.mm.default or product.args[0] is not grad2d
            or _t_of(product.args[1]) is not m.fc2_weight_t):
        return None
    hidden += [product, m.backward]
    grad_a2d = m.backward
    users = list(m.backward.users)
    if len(users) == 1 and users[0].target in _VIEWS and users[0].meta["val"].dim() == 2:
        grad_a2d = users[0]
        hidden.append(grad_a2d)
    grad_x = grad_w = grad_b = None
    rest: list[fx.Node] = []
    for user in grad_a2d.users:
        if (user.target is aten.mm.default and user.args[0] is grad_a2d
                and _t_of(user.args[1]) is m.weight_t):
            grad_x = user
            rest += [user, user.args[1]]
        elif user.target is aten.t.default and len(user.users) == 1:
            (w,) = user.users
            if w.target is aten.mm.default and w.args == (user, m.x2d):
                grad_w = w
                rest += [user, w]
        elif (user.target is aten.sum.dim_IntList and list(user.args[1:]) == [[0], True]
              and not user.kwargs):
            grad_b = user
            rest.append(user)
    if grad_x is None or grad_w is None or (grad_b is None) != (m.bias is None):
        return None
    if len(grad_a2d.users) != 2 + (grad_b is not None):
        return None
    outputs = [grad_x, grad_w] + ([grad_b] if grad_b is not None else [])
    if not only_read_inside([*hidden, *rest], outputs):
        return None
    return hidden, rest, outputs, grad2d


def fuse_mlp_backwards(module: fx.GraphModule) -> int:
    """Fuse fc1's gradients of every matched MLP of a joint graph into one node; returns
    how many.

    The fused node calls the captured ops (the default); its ``meta["monet_mlp"]``
    says what the chunked alternative reads and leaves unmade (:func:`mlp_sites`).
    """
    graph = module.graph
    fused_count = 0
    for node in list(graph.nodes):
        m = _match(node) if node.graph is graph else None
        found = _backward_nodes(m) if m is not None else None
        if found is None:
            continue
        hidden, rest, outputs, grad2d = found
        fused = fuse(graph, rest, outputs, "mlp_backward")
        fused.meta["monet_mlp"] = {
            "hidden": hidden, "activation_backward": m.backward,
            "weight_grad": m.weight_grad, "grad2d": grad2d, "x2d": m.x2d,
            "weight_t": m.weight_t, "bias": m.bias, "fc2_weight_t": m.fc2_weight_t,
            "activation": m.activation,
            "approximate": m.approximate, "factors": m.factors, "a": m.a,
        }
        fused_count += 1
    if fused_count:
        graph.lint()
        module.recompile()
    return fused_count


def _forward_chain(spec: dict) -> list[fx.Node] | None:
    """The forward ops of an MLP without dropout, fc1 to fc2, or None:
    ``fc1`` → (views) → the activation → (views) → ``h2d`` → ``fc2``.

    Under ``mlp.chunked`` fc2 computes the rest itself from ``x``, so every node
    before it holds an empty value: none may be read by anything else than the
    chain, the activation's backward (``a``) and fc2's weight gradient (``h2d``).
    """
    if spec["factors"]:
        return None
    weight_grad, backward = spec["weight_grad"], spec["activation_backward"]
    h2d = weight_grad.args[1]
    fc2_nodes = [u for u in h2d.users if u is not weight_grad]
    if len(fc2_nodes) != 1 or _fc1(fc2_nodes[0]) is None:
        return None
    chain, node = [fc2_nodes[0]], h2d
    activation = aten.gelu.default if spec["activation"] == "gelu" else aten.silu.default
    while isinstance(node, fx.Node) and node.target in (*_VIEWS, aten.clone.default,
                                                        activation):
        chain.append(node)
        node = node.args[0]
    if node is not _source(spec["a"]) or _fc1(node) != (spec["x2d"], spec["weight_t"],
                                                       spec["bias"]):
        return None
    chain.append(node)
    chain.reverse()
    if [n.target for n in chain].count(activation) != 1:
        return None
    allowed = {*chain, backward, weight_grad}
    if any(not set(n.users) <= allowed for n in chain[:-1]):
        return None
    return chain


def mlp_weight_grad_recompute(
    grad_t: torch.Tensor,
    x2d: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    approximate: str,
    factors: list,
    chunks: int | None = None,
) -> torch.Tensor:
    """``grad_t @ h`` (fc2's weight gradient) with ``h`` rebuilt from ``x`` chunk by chunk."""
    width = weight_t.shape[1]
    out = None
    for rows in _rows(x2d.shape[0], width, x2d.element_size(), chunks):
        h = _hidden(_pre_activation(x2d, weight_t, bias, rows), activation, approximate,
                    factors, width, rows)
        if out is None:
            out = torch.mm(grad_t[:, rows], h)
        else:
            out.addmm_(grad_t[:, rows], h)
    return out


def mlp_backward_chunked(
    grad2d: torch.Tensor,
    x2d: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    fc2_weight_t: torch.Tensor,
    activation: str,
    approximate: str,
    factors: list,
    chunks: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """The fused MLP backward a chunk of tokens at a time: fc1 is rerun per chunk,
    and no full-width value or gradient is ever whole.

    Returns what the captured ops return: the input's gradient (tokens × in),
    fc1's weight gradient (hidden × in) and, with a bias, its gradient (1 × hidden).
    """
    width = weight_t.shape[1]
    grad_x = grad2d.new_empty(x2d.shape[0], weight_t.shape[0])
    fc1_grad = bias_grad = None
    mask, scale = (factors[0], factors[1]) if factors else (None, None)
    for rows in _rows(x2d.shape[0], width, x2d.element_size(), chunks):
        a = _pre_activation(x2d, weight_t, bias, rows)
        g = torch.mm(grad2d[rows], fc2_weight_t.t())
        if mask is not None:
            g = aten.native_dropout_backward.default(g, mask.reshape(-1, width)[rows], scale)
        if activation == "gelu":
            g = aten.gelu_backward.default(g, a, approximate=approximate)
        else:
            g = aten.silu_backward.default(g, a)
        del a
        grad_x[rows] = torch.mm(g, weight_t.t())
        part = torch.mm(g.t(), x2d[rows])
        fc1_grad = part if fc1_grad is None else fc1_grad.add_(part)
        if bias is not None:
            part = g.sum(0, keepdim=True)
            bias_grad = part if bias_grad is None else bias_grad.add_(part)
    result = (grad_x, fc1_grad)
    return result if bias is None else (*result, bias_grad)


def mlp_forward_chunked(
    x2d: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    fc2_weight_t: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    activation: str,
    approximate: str,
    chunks: int | None = None,
) -> torch.Tensor:
    """fc2's output (tokens × out) computed from ``x`` a chunk of tokens at a time:
    fc1, the activation and fc2 per chunk, so no full-width value is ever whole."""
    out = x2d.new_empty(x2d.shape[0], fc2_weight_t.shape[1])
    width = weight_t.shape[1]
    for rows in _rows(x2d.shape[0], width, x2d.element_size(), chunks):
        h = _activate(_pre_activation(x2d, weight_t, bias, rows), activation, approximate)
        out[rows] = torch.mm(h, fc2_weight_t) if fc2_bias is None else torch.addmm(
            fc2_bias, h, fc2_weight_t)
        del h
    return out


def mlp_sites(node: fx.Node) -> list[Site]:
    spec = node.meta.get("monet_mlp") if node.op == "call_function" else None
    if spec is None:
        return []
    weight_grad = spec["weight_grad"]
    common = (spec["x2d"], spec["weight_t"], spec["bias"])
    # The count is an argument of every rewrite, so the profile keys on it too. Fewer
    # chunks are faster, more hold less: where the size asks for fewer than ``CHUNKS``,
    # both are offered (``_fine``: ``CHUNKS``), and the solver picks by budget.
    x2d, weight_t = (n.meta["val"] for n in common[:2])
    by_size = chunk_count(x2d.shape[0], weight_t.shape[1], x2d.element_size())
    # ``a``'s gradient is never made whole: the fused node computes it a chunk at a time
    # from fc2's output gradient, and the ops that made it make nothing.
    hidden, hidden_dropped = unmade(spec["hidden"], _VIEWS)
    chain = _forward_chain(spec)
    if chain is not None:
        *skip, fc2 = chain
        # fc1, the activation (and a dropout-0 copy): their values are never made.
        forward, forward_dropped = unmade(skip, _VIEWS)
    alternatives = []
    for chunks in dict.fromkeys((by_size, CHUNKS)):
        suffix = "" if chunks == by_size else "_fine"
        rewrites = (
            Rewrite(weight_grad, mlp_weight_grad_recompute, (
                weight_grad.args[0], *common, spec["activation"], spec["approximate"],
                spec["factors"], chunks)),
            *hidden,
            Rewrite(node, mlp_backward_chunked, (
                spec["grad2d"], *common, spec["fc2_weight_t"], spec["activation"],
                spec["approximate"], spec["factors"], chunks)),
        )
        alternatives.append(Alternative(f"mlp.backward_chunked{suffix}", rewrites,
                                        drops=tuple(hidden_dropped)))
        if chain is not None:
            fused = Rewrite(fc2, mlp_forward_chunked, (
                *common, spec["fc2_weight_t"], _fc1(fc2)[2], spec["activation"],
                spec["approximate"], chunks))
            # fc2's output rounds differently by row chunk (about an ulp): harmless unless
            # a discrete op downstream (a max-pool's argmax) could then decide otherwise.
            alternatives.append(Alternative(
                f"mlp.chunked{suffix}", (*rewrites, *forward, fused),
                drops=(*forward_dropped, *hidden_dropped),
                forward_rounding=feeds_a_discrete_op(fc2)))
    return [Site(node.name, tuple(alternatives))]
