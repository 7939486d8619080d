"""Reversible Vision Transformers (Mangalam et al., CVPR 2022).

A ViT whose blocks act on two streams of tokens, X1 and X2, both initialised
with the patch embedding. Block i computes

    Y1 = X1 + F(X2),    F = LayerNorm -> multi-head self-attention
    Y2 = X2 + G(Y1),    G = LayerNorm -> MLP (4x, GELU)

so its inputs can be rebuilt from its outputs (X2 = Y2 - G(Y1), X1 = Y1 - F(X2))
and the backward pass needs no stored activations inside the stack. The head
follows the official SlowFast configs (``REV_VIT_S/B``: ``RESPATH_FUSE:
concat``, no class token, no mean-pooling flag): the two streams are
concatenated, then LayerNorm over 2x the width, mean over tokens, Linear.
F and G are deterministic (no dropout, no stochastic depth), as reversibility
needs: the backward recomputes them and must get the very same values.

Two execution modes share one module and one set of weights:

- ``reversible=True``: the stack runs inside :class:`ReversibleStack`, an
  autograd Function whose forward runs under no_grad and saves only the
  stack's final (Y1, Y2); its backward rebuilds each block's inputs and
  differentiates F and G one block at a time. The block parameters are explicit
  inputs of the Function and the backward is a pure function of its saved
  tensors (``torch.func.functional_call`` and ``torch.autograd.grad``, never
  ``.backward()`` or ``.grad``), so AOTAutograd captures the whole reversible
  step, recomputation included, as one joint graph.
- ``reversible=False`` (or :meth:`RevViT.twin`): the same blocks under plain
  autograd, which stores every block's activations.

The reversible backward returns the gradients of all block parameters at once,
so a transient copy of the blocks' parameter gradients exists at the end of
the stack's backward; activations stay constant in depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.nn import functional

from monet.models.registry import random_images, register

__all__ = ["RevViT", "RevViTConfig", "ReversibleBlock", "ReversibleStack"]


@dataclass(frozen=True)
class RevViTConfig:
    """The shape of a Rev-ViT."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    mlp_ratio: float = 4.0


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = functional.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class AttentionSubBlock(nn.Module):
    """F: LayerNorm then self-attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(tokens))


class MLPSubBlock(nn.Module):
    """G: LayerNorm then a two-layer GELU MLP."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.gelu(self.fc1(self.norm(tokens))))


class ReversibleBlock(nn.Module):
    """One reversible block: Y1 = X1 + F(X2), Y2 = X2 + G(Y1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.F = AttentionSubBlock(dim, num_heads)
        self.G = MLPSubBlock(dim, mlp_ratio)

    def forward(self, X1: torch.Tensor, X2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Y1 = X1 + self.F(X2)
        Y2 = X2 + self.G(Y1)
        return Y1, Y2


def _take(module: nn.Module, tensors: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """The first tensors of ``tensors`` as ``module``'s parameter dict, and the rest."""
    names = [name for name, _ in module.named_parameters()]
    return dict(zip(names, tensors)), tensors[len(names) :]


def _leaves(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    # Fresh leaves so the nested autograd.grad differentiates only this block's recomputation.
    return [tensor.detach().requires_grad_() for tensor in tensors]


class ReversibleStack(torch.autograd.Function):
    """Runs reversible blocks saving only the last (Y1, Y2); the backward rebuilds the rest.

    ``apply(X1, X2, blocks, *parameters)``: ``parameters`` are every block's
    ``F`` then ``G`` parameters in ``named_parameters`` order, passed in so that
    autograd (and AOTAutograd's trace) sees them as inputs and receives their
    gradients from this backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        X1: torch.Tensor,
        X2: torch.Tensor,
        blocks: nn.ModuleList,
        *parameters: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.blocks = blocks
        remaining = list(parameters)
        for block in blocks:
            F_state, remaining = _take(block.F, remaining)
            G_state, remaining = _take(block.G, remaining)
            Y1 = X1 + functional_call(block.F, F_state, (X2,))
            Y2 = X2 + functional_call(block.G, G_state, (Y1,))
            X1, X2 = Y1, Y2
        ctx.save_for_backward(X1, X2, *parameters)
        return X1, X2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dY1: torch.Tensor, dY2: torch.Tensor) -> tuple[Any, ...]:
        Y1, Y2, *parameters = ctx.saved_tensors
        states = []
        remaining = parameters
        for block in ctx.blocks:
            F_state, remaining = _take(block.F, remaining)
            G_state, remaining = _take(block.G, remaining)
            states.append((F_state, G_state))
        gradients: list[list[torch.Tensor]] = []
        for block, (F_state, G_state) in zip(reversed(ctx.blocks), reversed(states)):
            with torch.enable_grad():
                Y1_leaf, *G_leaves = _leaves((Y1, *G_state.values()))
                G_Y1 = functional_call(block.G, dict(zip(G_state, G_leaves)), (Y1_leaf,))
                dY1_from_G, *dG = torch.autograd.grad(G_Y1, [Y1_leaf, *G_leaves], dY2)
            X2 = Y2 - G_Y1.detach()
            dX1 = dY1 + dY1_from_G
            with torch.enable_grad():
                X2_leaf, *F_leaves = _leaves((X2, *F_state.values()))
                F_X2 = functional_call(block.F, dict(zip(F_state, F_leaves)), (X2_leaf,))
                dX2_from_F, *dF = torch.autograd.grad(F_X2, [X2_leaf, *F_leaves], dX1)
            X1 = Y1 - F_X2.detach()
            dX2 = dY2 + dX2_from_F
            gradients.append(dF + dG)
            Y1, Y2, dY1, dY2 = X1, X2, dX1, dX2
        parameter_gradients = [grad for block_grads in reversed(gradients) for grad in block_grads]
        return (dY1, dY2, None, *parameter_gradients)


class RevViT(nn.Module):
    """Rev-ViT: patch embedding, reversible two-stream blocks, LayerNorm, mean pool, Linear."""

    def __init__(
        self, config: RevViTConfig | None = None, reversible: bool = True, **overrides: Any
    ):
        super().__init__()
        config = RevViTConfig(**{**asdict(config or RevViTConfig()), **overrides})
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of "
                f"patch_size {config.patch_size}"
            )
        self.config = config
        self.reversible = reversible
        dim = config.embed_dim
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(
            config.in_channels, dim, config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.ModuleList(
            ReversibleBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        # The two streams are fused by concatenation, so the head sees twice the width.
        self.norm = nn.LayerNorm(2 * dim, eps=1e-6)
        self.head = nn.Linear(2 * dim, config.num_classes)
        self._initialise()

    def _initialise(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        if self.reversible and torch.is_grad_enabled():
            parameters = [
                p for block in self.blocks for sub in (block.F, block.G) for p in sub.parameters()
            ]
            X1, X2 = ReversibleStack.apply(tokens, tokens, self.blocks, *parameters)
        else:
            X1, X2 = tokens, tokens
            for block in self.blocks:
                X1, X2 = block(X1, X2)
        fused = self.norm(torch.cat([X1, X2], dim=-1))
        return self.head(fused.mean(dim=1))

    def twin(self, reversible: bool = False) -> RevViT:
        """A copy with the same weights (copied) that runs in the other mode by default."""
        reference = next(self.parameters())
        with torch.device(reference.device):
            other = RevViT(self.config, reversible=reversible)
        other.to(reference.dtype)
        other.load_state_dict(self.state_dict())
        return other.train(self.training)


@register(
    "revvit_s",
    example_inputs=random_images(224),
    default_batch=8,
    tags=("revvit", "paper", "reversible"),
)
def revvit_s(reversible: bool = True, **overrides: Any) -> RevViT:
    """Rev-ViT-S: width 384, depth 12, 6 heads, 224² images, 16² patches.

    Paper: 22M parameters, 4.6 GFLOPs; here 22.43M (the 2x-wide head adds 0.38M
    to ViT-S) and 4.57G multiply-adds.
    """
    config = RevViTConfig(embed_dim=384, depth=12, num_heads=6)
    return RevViT(config, reversible=reversible, **overrides)


@register(
    "revvit_b",
    example_inputs=random_images(224),
    default_batch=2,
    tags=("revvit", "paper", "reversible"),
)
def revvit_b(reversible: bool = True, **overrides: Any) -> RevViT:
    """Rev-ViT-B: width 768, depth 12, 12 heads, 224² images, 16² patches.

    Paper: 87M parameters, 17.6 GFLOPs; here 87.34M and 17.47G multiply-adds.
    """
    config = RevViTConfig(embed_dim=768, depth=12, num_heads=12)
    return RevViT(config, reversible=reversible, **overrides)


@register(
    "revvit_tiny_test",
    example_inputs=random_images(32),
    default_batch=2,
    tiny=True,
    tags=("revvit", "reversible"),
)
def revvit_tiny_test(reversible: bool = True, **overrides: Any) -> RevViT:
    """A two-block Rev-ViT on 32² images for unit tests."""
    config = RevViTConfig(
        embed_dim=32, depth=2, num_heads=2, image_size=32, patch_size=8, num_classes=10
    )
    return RevViT(config, reversible=reversible, **overrides)
