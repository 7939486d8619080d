"""A ViT-style classifier: monet's embedded default model and its test subject.

Patch embedding, pre-norm transformer blocks (multi-head self-attention
through ``scaled_dot_product_attention``, LayerNorm, GELU MLP), dropout after
attention and MLP, a class token and a linear head (Dosovitskiy et al., 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monet.models.registry import random_images, register


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.dropout(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(x + self.position)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register("vit_s16", example_inputs=random_images(224), default_batch=8, tags=("vit", "default"))
def vit_s16(**overrides) -> VisionTransformer:
    """ViT-S/16 (22M parameters) at 224²."""
    return VisionTransformer(**overrides)


@register("vit_small_demo", example_inputs=random_images(64), default_batch=16, tags=("vit", "demo"))
def vit_small_demo(**overrides) -> VisionTransformer:
    """The demo's default: a 6-block ViT on 64² images, a step of about a second on 2 cores."""
    config = {"image_size": 64, "patch_size": 8, "dim": 192, "depth": 6, "heads": 3,
              "num_classes": 100}
    return VisionTransformer(**{**config, **overrides})


@register("vit_tiny_test", example_inputs=random_images(16), default_batch=2, tiny=True,
          tags=("vit",))
def vit_tiny_test(**overrides) -> VisionTransformer:
    """Two blocks, 16² images: for unit tests."""
    config = {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
              "num_classes": 10}
    return VisionTransformer(**{**config, **overrides})
