"""Operator variants: other implementations of an op of the joint graph.

A variant is found by matching a pattern in the captured aten graph; it
rewrites one or more nodes (a new target and arguments) so that they read
other values, take another time or need another workspace, with the same
results up to float rounding (lossy variants say so and are off by default).
The solver picks one alternative per site together with what to keep and
recompute (``monet.solver.problem.Choice``); the lowering applies the rewrites
the schedule names.

    sites = find_sites(order, forward_nodes)   # graph.py
    choice = site.choice(index, timings)       # profile.py, once measured
    apply_rewrites(graph, chosen)              # lower.py

Each variant lives in its own module with its forward or backward function
and is tested for equality with the default (``tests/operators``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx


class VariantRefused(ValueError):
    """A variant cannot run on these values (e.g. a norm weight with exact zeros)."""


@dataclass(frozen=True)
class Rewrite:
    """Run ``node`` as ``target(*args, **kwargs)``; the arguments may name other graph nodes."""

    node: fx.Node
    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    overwrites: fx.Node | None = None
    """An argument whose storage the rewritten node writes its first output into (in
    place): it must die there, which ``graph.analyse`` checks by storage."""

    def inputs(self) -> list[fx.Node]:
        """The nodes the rewritten node reads, in fx's ``all_input_nodes`` order."""
        found: dict[fx.Node, None] = {}
        fx.node.map_arg((self.args, self.kwargs), lambda n: found.setdefault(n))
        return list(found)


@dataclass(frozen=True)
class Alternative:
    name: str
    rewrites: tuple[Rewrite, ...]
    drops: tuple[fx.Node, ...] = ()
    """Forward nodes whose values this alternative never computes: their storages hold no
    bytes, and only the alternative's rewritten nodes or views of them read them."""
    lossy: bool = False
    """Changes results beyond float rounding: only offered when asked for."""
    forward_rounding: bool = False
    """Another kernel for a forward op: its values round differently from eager's, and a
    discrete op downstream (a max-pool's argmax, a ReLU at 0) can then decide
    differently. Only offered when asked for; backward-only variants never do this."""


@dataclass(frozen=True)
class Site:
    """An op with alternative implementations (the captured one is implied)."""

    name: str
    alternatives: tuple[Alternative, ...]


Finder = Callable[[fx.Node], Iterable[Site]]


def skipped(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What a node holds that an alternative never computes (its ``drops``): nothing,
    as nothing but the alternative's own nodes reads it."""
    return torch.empty(0, dtype=dtype, device=device)


def same(value: torch.Tensor) -> torch.Tensor:
    """A view of a skipped value: the same empty tensor."""
    return value


def unmade(nodes: Iterable[fx.Node], views: Iterable[Any]) -> tuple[list[Rewrite], list[fx.Node]]:
    """Rewrites that leave ``nodes`` holding nothing (a view, by target in ``views``, the
    same empty tensor as its base; any other node an empty one), and the nodes among them
    whose storages the alternative then drops (all but the views)."""
    views = set(views)
    rewrites, dropped = [], []
    for n in nodes:
        if n.target in views:
            rewrites.append(Rewrite(n, same, (n.args[0],)))
        else:
            value = n.meta["val"]
            rewrites.append(Rewrite(n, skipped, (value.dtype, value.device)))
            dropped.append(n)
    return rewrites, dropped


def overwritable(value: object, node: fx.Node) -> bool:
    """Whether ``node`` may write its first output over ``value``: ``node`` is its only
    reader, and it is a whole, dense tensor laid out as that output."""
    if not isinstance(value, fx.Node) or value.op != "call_function" or set(value.users) != {node}:
        return False
    held, made = value.meta.get("val"), node.meta.get("val")
    made = made[0] if isinstance(made, (tuple, list)) else made
    if not (isinstance(held, torch.Tensor) and isinstance(made, torch.Tensor)):
        return False
    return (
        held.shape == made.shape
        and held.stride() == made.stride()
        and held.dtype == made.dtype
        and held.device == made.device
        and held.storage_offset() == 0
        and held.untyped_storage().nbytes() == held.numel() * held.element_size()
    )


def _finders() -> list[Finder]:
    from monet.operators import attention, conv, mlp, norms, pooling

    return [norms.layer_norm_sites, norms.batch_norm_sites, conv.convolution_sites,
            mlp.mlp_sites, attention.attention_sites, pooling.max_pool_sites]


def find_sites(
    nodes: Iterable[fx.Node], lossy: bool = False, forward_kernels: bool = False,
    forward: set[fx.Node] | None = None,
) -> list[Site]:
    """Every variant site among ``nodes`` (the joint graph's calls, in monet's order).

    With ``forward`` (the joint graph's forward nodes), a reversible rebuild's site comes
    first: it rewrites the backward's reads of the rebuild, and claims those nodes.
    """
    nodes = list(nodes)
    sites = []
    if forward is not None:
        from monet.operators.reversible import reversible_sites

        sites += reversible_sites(nodes, forward)
    finders = _finders()
    claimed = {r.node for site in sites for a in site.alternatives for r in a.rewrites}
    for node in nodes:
        if node.op != "call_function":
            continue
        for finder in finders:
            for site in finder(node):
                alternatives = tuple(
                    a for a in site.alternatives
                    if (lossy or not a.lossy) and (forward_kernels or not a.forward_rounding)
                )
                touched = {r.node for a in alternatives for r in a.rewrites}
                if not alternatives or touched & claimed:
                    continue
                claimed |= touched
                sites.append(Site(site.name, alternatives))
    return sites


def apply_rewrites(graph: fx.Graph, rewrites: Iterable[Rewrite], env: dict[fx.Node, fx.Node]):
    """Point the copies (``env``) of the rewritten nodes at their variant's target and args."""
    for rewrite in rewrites:
        copy = env[rewrite.node]
        copy.target = rewrite.target
        copy.args = fx.node.map_arg(rewrite.args, lambda n: env[n])
        copy.kwargs = fx.node.map_arg(rewrite.kwargs, lambda n: env[n])
    graph.lint()
