"""Written-out attention, ``softmax(Q·Kᵀ + bias)·V``, a chunk of queries at a time.

A model that writes its attention out keeps the N×M probabilities for the
backward, and its backward makes more values of that size (their gradient, the
logits'). MViTv2 and SAM's image encoder must write it out: they add a
decomposed relative-position bias to the logits, ``bias_h[..., :, None] +
bias_w[..., None, :]`` over the key grid, and need its gradient, which
``scaled_dot_product_attention``'s fused kernels do not give. The variant
``attention.backward_chunked`` recomputes each chunk of queries' probabilities
in the backward, as flash attention does, so the backward reads ``Q``, ``Kᵀ``,
``V`` and the bias's factors (N·(kh + kw) values) instead of the probabilities
and holds no N×M value whole: the bias is rebuilt per chunk from its factors and
its gradient reduced per chunk. It recomputes the probabilities twice (once for
V's gradient, once for the rest), as the backward is three nodes (below). With
``attention.chunked`` the forward runs a chunk of queries at a time too, so no
N×M value exists even there; its output rounds differently from the captured
product's by about an ulp, so it waits for ``kernel_variants=True`` where a
discrete op (a max-pool's argmax) lies downstream, as in MViTv2.

The attention's backward is first fused into three nodes that run the captured
ops (:func:`fuse_attention_backwards`, bit for bit the unfused graph, the
softmax's backward written over its incoming gradient as
:mod:`monet.operators.inplace` writes it): V's gradient, the logits' gradient,
and the rest (the gradients of Q, Kᵀ and the bias's factors), so that the default
frees what the captured ops free where they free it. The variants override all
three: the first recomputes V's gradient, the second makes nothing (its storage is
the alternative's ``drops``), the third computes the rest from the output's
gradient, which it then reads where the captured rest reads the logits' gradient
(a backward value read elsewhere, which the problem allows for values the
backward allocates). ``attention.chunked`` overrides the forward's product with
``V`` too, the forward's logits, bias and probabilities then holding nothing.
Results equal aten's up to float rounding (products over a chunk of rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from monet.operators import (
    Alternative,
    Rewrite,
    Site,
    overwritable,
    skipped,
    unmade,
)
from monet.operators.fusion import feeds_a_discrete_op, fuse, only_read_inside
from monet.operators.inplace import write_into

aten = torch.ops.aten

CHUNKS = 8
"""At most this many query chunks: the backward holds an eighth of the N×M values at a time."""
CHUNK_BYTES = 1 << 20
"""About this many bytes of N×M values per chunk."""

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _call(node: object, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: fx.Node) -> tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _transpose_of(node: object, of: fx.Node) -> bool:
    """Whether ``node`` swaps the last two dimensions of the 3-D ``of``."""
    return (_call(node, aten.transpose.int) and node.args[0] is of
            and sorted(d % 3 for d in node.args[1:3]) == [1, 2])


def _through_views(node: fx.Node, chain: list[fx.Node], also=()) -> fx.Node:
    """``node`` through reshaping views (and ``also``), each one appended to ``chain``."""
    while _call(node, *_VIEWS, *also):
        chain.append(node)
        node = node.args[0]
    return node


@dataclass(frozen=True)
class _Forward:
    """One written-out attention's forward in the joint graph."""

    softmax: fx.Node
    queries: fx.Node
    """``Q`` (scaled), batch×heads × N × d: the logits' product reads it."""
    keys_t: fx.Node
    """``Kᵀ``, batch×heads × d × M."""
    values: fx.Node
    """``V``, batch×heads × M × dv."""
    bias_h: fx.Node | None
    """The bias's factors, batch × heads × qh × qw × kh and × kw (None: no bias)."""
    bias_w: fx.Node | None
    probabilities: fx.Node
    """The probabilities as the product with ``V`` reads them (batch×heads × N × M)."""
    product: fx.Node
    """``probabilities · V``: the attention's output."""
    unmade: tuple[fx.Node, ...]
    """The forward nodes from the logits to the probabilities, which the chunked
    forward never computes."""


def _bias(node: fx.Node, batch: int, heads: int, tokens: int, keys: int):
    """(bias_h, bias_w, its nodes) when ``node`` is the decomposed bias
    ``(bias_h[..., :, None] + bias_w[..., None, :])`` reshaped to the logits', or None."""
    chain: list[fx.Node] = []
    total = _through_views(node, chain, also=(aten.clone.default,))
    if not _call(total, aten.add.Tensor) or len(total.args) != 2 or total.kwargs:
        return None
    shape = _shape(total)
    if len(shape) != 6 or shape[:2] != (batch, heads):
        return None
    _, _, qh, qw, kh, kw = shape
    if qh * qw != tokens or kh * kw != keys:
        return None
    factors = {}
    for part in total.args:
        if not _call(part, aten.unsqueeze.default) or len(_shape(part.args[0])) != 5:
            return None
        factors[part.args[1] % 6] = part.args[0]
    bias_h, bias_w = factors.get(5), factors.get(4)
    if bias_h is None or bias_w is None:
        return None
    if _shape(bias_h) != (batch, heads, qh, qw, kh) or _shape(bias_w) != (batch, heads, qh, qw, kw):
        return None
    return bias_h, bias_w, [*chain, total]


def _forward(softmax: fx.Node) -> _Forward | None:
    """The attention whose softmax is ``softmax``, or None."""
    if not _call(softmax, aten._softmax.default) or softmax.args[2]:
        return None
    shape = _shape(softmax)
    if len(shape) != 4 or softmax.args[1] % 4 != 3:
        return None
    batch, heads, tokens, keys = shape
    logits, unmade = softmax.args[0], [softmax]
    bias_h = bias_w = None
    if _call(logits, aten.add.Tensor) and len(logits.args) == 2 and not logits.kwargs:
        unmade.append(logits)
        for k in (0, 1):
            found = _bias(logits.args[1 - k], batch, heads, tokens, keys)
            if found is not None and _call(logits.args[k], *_VIEWS):
                bias_h, bias_w, nodes = found
                unmade += nodes
                logits = logits.args[k]
                break
        else:
            return None
    scores = _through_views(logits, unmade)
    if not _call(scores, aten.bmm.default) or _shape(scores) != (batch * heads, tokens, keys):
        return None
    unmade.append(scores)
    queries, keys_t = scores.args
    # The probabilities: detached for the backward, and (expanded,) viewed as 3-D for V.
    readers = [u for u in softmax.users if not _call(u, aten.detach.default)]
    unmade += [u for u in softmax.users if _call(u, aten.detach.default)]
    if len(readers) != 1:
        return None
    probabilities = readers[0]
    if _call(probabilities, aten.expand.default) and _shape(probabilities) == shape:
        unmade.append(probabilities)
        (probabilities,) = probabilities.users if len(probabilities.users) == 1 else (None,)
    if not _call(probabilities, *_VIEWS) or _shape(probabilities) != (batch * heads, tokens, keys):
        return None
    unmade.append(probabilities)
    products = [u for u in probabilities.users
                if _call(u, aten.bmm.default) and u.args[0] is probabilities]
    if len(products) != 1:
        return None
    product = products[0]
    values = product.args[1]
    if len(_shape(values)) != 3:
        return None
    return _Forward(softmax, queries, keys_t, values, bias_h, bias_w, probabilities, product,
                    tuple(unmade))


def _single_user(node: fx.Node, *targets) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and _call(users[0], *targets) else None


@dataclass(frozen=True)
class _Backward:
    """One written-out attention's backward, in the three pieces it is fused into."""

    values: list[fx.Node]
    """``bmm(Pᵀ, G)``: the gradient of V."""
    scores: list[fx.Node]
    """``bmm(G, Vᵀ)`` to the softmax's backward: the gradient of the logits."""
    rest: list[fx.Node]
    """From the logits' gradient to those of Q, Kᵀ and the bias's factors."""
    grad_values: fx.Node
    softmax_backward: fx.Node
    outputs: list[fx.Node]
    """The rest's outputs: the gradients of Q, Kᵀ[, bias_h, bias_w]."""
    grad: fx.Node
    """The output's gradient, G."""


def _backward(f: _Forward) -> _Backward | None:
    """``f``'s backward, or None. Autograd's formulas give: ``bmm(Pᵀ, G)`` for ``V``;
    ``bmm(G, Vᵀ)`` (viewed) → the softmax's backward (``S``) → viewed 3-D,
    ``bmm(S, K)`` for ``Q`` and ``bmm(Qᵀ, S)`` for ``Kᵀ``; with a bias, ``S`` viewed
    6-D and summed over the key grid's columns for ``bias_h`` and rows for ``bias_w``."""
    detached = {f.softmax, *(u for u in f.softmax.users if _call(u, aten.detach.default))}
    backwards = [u for d in detached for u in d.users if u not in detached
                 and _call(u, aten._softmax_backward_data.default, aten.detach.default)]
    scores: list[fx.Node] = []
    while len(backwards) == 1 and _call(backwards[0], aten.detach.default):
        scores.append(backwards[0])
        backwards = list(backwards[0].users)
    if len(backwards) != 1 or not _call(backwards[0], aten._softmax_backward_data.default):
        return None
    softmax_backward = backwards[0]
    if softmax_backward.args[2] % 4 != 3:
        return None
    grad_probabilities = _through_views(softmax_backward.args[0], scores)
    if not _call(grad_probabilities, aten.bmm.default):
        return None
    grad, values_t = grad_probabilities.args
    if not _transpose_of(values_t, f.values):
        return None
    scores += [grad_probabilities, values_t, softmax_backward]
    values = []
    for user in f.probabilities.users:
        if _transpose_of(user, f.probabilities):
            product = _single_user(user, aten.bmm.default)
            if product is not None and product.args == (user, grad):
                values = [user, product]
    if not values:
        return None
    flat = grid = None
    for user in softmax_backward.users:
        if _call(user, *_VIEWS) and len(_shape(user)) == 3:
            flat = user
        elif _call(user, *_VIEWS) and len(_shape(user)) == 6:
            grid = user
    if (flat is None or (grid is None) != (f.bias_h is None)
            or len(softmax_backward.users) != 1 + (grid is not None)):
        return None  # another reader would be handed the variants' empty value
    rest = [flat]
    grad_queries = grad_keys_t = None
    for user in flat.users:
        if not _call(user, aten.bmm.default):
            return None
        first, second = user.args
        if first is flat and _transpose_of(second, f.keys_t):
            grad_queries = user
            rest += [second, user]
        elif second is flat and _transpose_of(first, f.queries):
            grad_keys_t = user
            rest += [first, user]
    if grad_queries is None or grad_keys_t is None:
        return None
    outputs = [grad_queries, grad_keys_t]
    if grid is not None:
        rest.append(grid)
        sums = {}
        for user in grid.users:
            if not (_call(user, aten.sum.dim_IntList) and len(user.args[1]) == 1
                    and user.args[2:] == (True,) and not user.kwargs):
                return None
            axis = user.args[1][0] % 6
            squeeze = _single_user(user, aten.squeeze.dim)
            if axis not in (4, 5) or squeeze is None or squeeze.args[1] % 6 != axis:
                return None
            sums[axis] = squeeze
            rest += [user, squeeze]
        if set(sums) != {4, 5}:
            return None
        outputs += [sums[5], sums[4]]  # bias_h sums over the key grid's columns
    if len(flat.users) != 2 or (grid is not None and len(grid.users) != 2):
        return None
    if not (only_read_inside(values, [values[-1]])
            and only_read_inside(scores, [softmax_backward])
            and only_read_inside(rest, outputs)):
        return None
    return _Backward(values, scores, rest, values[-1], softmax_backward, outputs, grad)


def fuse_attention_backwards(module: fx.GraphModule) -> int:
    """Fuse every matched written-out attention's backward of a joint graph into three
    nodes (:class:`_Backward`'s pieces), in the captured order; returns how many
    attentions. The rest's node carries ``meta["monet_attention"]``, what the chunked
    alternatives read (:func:`attention_sites`).

    Three nodes, not one, so that the default frees what the captured ops free where
    they free it: V and the probabilities die with the softmax's backward, the
    output's gradient after its last product; only the gradients of Q and Kᵀ are made
    before the bias factors' backward where the captured graph makes them after it."""
    graph = module.graph
    fused_count = 0
    for node in list(graph.nodes):
        f = _forward(node) if node.graph is graph else None
        b = _backward(f) if f is not None else None
        if b is None:
            continue
        incoming = b.softmax_backward.args[0]
        held = incoming.meta.get("val")
        if (isinstance(held, torch.Tensor) and held.device.type == "cpu"
                and overwritable(incoming, b.softmax_backward)
                and len(_through_views(incoming, []).users) == 1):
            # As the in-place pass writes it unfused (its CPU kernel reads a row's sum
            # before writing the row): one N×M value fewer, bit for bit.
            b.softmax_backward.args = (str(b.softmax_backward.target), 0,
                                       *b.softmax_backward.args)
            b.softmax_backward.target = write_into
        input_dtype = b.softmax_backward.args[-1]
        values = fuse(graph, b.values, [b.grad_values], "attention_values_backward")
        scores = fuse(graph, b.scores, [b.softmax_backward], "attention_scores_backward",
                         after=[values])
        rest = fuse(graph, b.rest, b.outputs, "attention_backward", after=[scores])
        rest.meta["monet_attention"] = {
            "forward": f, "grad": b.grad, "values": values, "scores": scores,
            "input_dtype": input_dtype,
        }
        fused_count += 1
    if fused_count:
        graph.lint()
        module.recompile()
    return fused_count


def _chunks(queries: torch.Tensor, keys: int, bias_h: torch.Tensor | None,
            chunks: int | None):
    """(query tokens, bias rows) per chunk: whole rows of the query grid with a bias.

    By default as many chunks as keep each chunk's N×M values near ``CHUNK_BYTES``, at
    most ``CHUNKS``: a small attention runs whole (its probabilities are still
    recomputed), as per-chunk products of a few rows cost more than they save."""
    batch_heads, tokens = queries.shape[:2]
    if chunks is None:
        total = batch_heads * tokens * keys * queries.element_size()
        chunks = min(CHUNKS, max(1, round(total / CHUNK_BYTES)))
    if bias_h is None:
        step = max(1, math.ceil(tokens / chunks))
        return [(slice(s, min(s + step, tokens)), None) for s in range(0, tokens, step)]
    rows, width = bias_h.shape[2], bias_h.shape[3]
    step = max(1, math.ceil(rows / chunks))
    return [(slice(s * width, min(s + step, rows) * width), slice(s, min(s + step, rows)))
            for s in range(0, rows, step)]


def _probabilities(queries, keys_t, bias_h, bias_w, tokens, rows):
    """One chunk's probabilities, as the captured ops compute them."""
    scores = torch.bmm(queries[:, tokens], keys_t)
    if bias_h is not None:
        batch, heads = bias_h.shape[:2]
        bias = bias_h[:, :, rows].unsqueeze(5) + bias_w[:, :, rows].unsqueeze(4)
        scores.view(batch, heads, -1, scores.shape[-1]).add_(
            bias.reshape(batch, heads, -1, scores.shape[-1]))
        del bias
    return aten._softmax.default(scores, -1, False)


def _accumulate(total: torch.Tensor | None, first: torch.Tensor, second: torch.Tensor):
    """``total + first·second``, into ``total`` (no product-sized temporary)."""
    return torch.bmm(first, second) if total is None else total.baddbmm_(first, second)


def attention_forward_chunked(
    queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
    bias_h: torch.Tensor | None, bias_w: torch.Tensor | None, chunks: int | None = None,
) -> torch.Tensor:
    """``softmax(Q·Kᵀ + bias)·V`` (batch×heads × N × dv) a chunk of queries at a time."""
    out = values.new_empty(queries.shape[0], queries.shape[1], values.shape[2])
    for tokens, rows in _chunks(queries, keys_t.shape[2], bias_h, chunks):
        # Into a chunk of its own, then copied: a product written into a slice of the
        # batch runs one matrix at a time.
        out[:, tokens] = torch.bmm(
            _probabilities(queries, keys_t, bias_h, bias_w, tokens, rows), values)
    return out


def attention_values_backward_chunked(
    grad: torch.Tensor, queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
    bias_h: torch.Tensor | None, bias_w: torch.Tensor | None, chunks: int | None = None,
) -> tuple[torch.Tensor]:
    """V's gradient, ``Σ Pᵀ·G`` over chunks of queries, each chunk's probabilities
    recomputed (a tuple, as the fused node it replaces returns)."""
    grad_values = None
    for tokens, rows in _chunks(queries, keys_t.shape[2], bias_h, chunks):
        probabilities = _probabilities(queries, keys_t, bias_h, bias_w, tokens, rows)
        grad_values = _accumulate(grad_values, probabilities.transpose(1, 2), grad[:, tokens])
    return (grad_values,)


def unfilled(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor]:
    """What the logits' gradient holds under the chunked backward: nothing (the rest's
    variant computes it a chunk at a time itself)."""
    return (skipped(dtype, device),)


def attention_backward_chunked(
    grad: torch.Tensor, queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
    bias_h: torch.Tensor | None, bias_w: torch.Tensor | None,
    input_dtype: torch.dtype = torch.float32, chunks: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """The gradients of Q, Kᵀ and, with a bias, of its factors, a chunk of queries at a
    time, each chunk's probabilities and their gradient recomputed."""
    grad_keys_t = None
    grad_queries = queries.new_empty(queries.shape)
    grad_h = None if bias_h is None else bias_h.new_empty(bias_h.shape)
    grad_w = None if bias_w is None else bias_w.new_empty(bias_w.shape)
    values_t, keys = values.transpose(1, 2), keys_t.transpose(1, 2)
    for tokens, rows in _chunks(queries, keys_t.shape[2], bias_h, chunks):
        probabilities = _probabilities(queries, keys_t, bias_h, bias_w, tokens, rows)
        scores = aten._softmax_backward_data.default(
            torch.bmm(grad[:, tokens], values_t), probabilities, -1, input_dtype)
        del probabilities
        if bias_h is not None:
            grid = scores.view(*bias_h.shape[:2], -1, *bias_h.shape[3:], bias_w.shape[-1])
            torch.sum(grid, 5, out=grad_h[:, :, rows])
            torch.sum(grid, 4, out=grad_w[:, :, rows])
        grad_queries[:, tokens] = torch.bmm(scores, keys)
        grad_keys_t = _accumulate(grad_keys_t, queries[:, tokens].transpose(1, 2), scores)
    result = (grad_queries, grad_keys_t)
    return result if bias_h is None else (*result, grad_h, grad_w)


def attention_sites(node: fx.Node) -> list[Site]:
    spec = node.meta.get("monet_attention") if node.op == "call_function" else None
    if spec is None:
        return []
    f: _Forward = spec["forward"]
    factors = (f.queries, f.keys_t, f.values, f.bias_h, f.bias_w)
    grad, scores = spec["grad"], spec["scores"]
    held = scores.meta["val"][0]
    backward = (
        Rewrite(spec["values"], attention_values_backward_chunked, (grad, *factors)),
        Rewrite(scores, unfilled, (held.dtype, held.device)),
        Rewrite(node, attention_backward_chunked, (grad, *factors, spec["input_dtype"])),
    )
    # The forward as captured: its probabilities die there unless kept for another
    # reader, and the logits' gradient is never made (``drops``).
    alternatives = [Alternative("attention.backward_chunked", backward, drops=(scores,))]
    allowed = {*f.unmade, f.product, spec["values"], scores}
    if all(set(n.users) <= allowed for n in f.unmade):
        # The logits, the bias and the probabilities: never made.
        forward, dropped = unmade(f.unmade, (*_VIEWS, aten.expand.default,
                                             aten.detach.default))
        forward.insert(0, Rewrite(f.product, attention_forward_chunked, factors))
        # The output rounds differently by chunk (about an ulp): harmless unless a
        # discrete op downstream (a max-pool's argmax) could then decide otherwise.
        alternatives.append(Alternative(
            "attention.chunked", (*backward, *forward),
            drops=(scores, *dropped),
            forward_rounding=feeds_a_discrete_op(f.product)))
    return [Site(node.name, tuple(alternatives))]
