"""MViTv2 (Li et al., "MViTv2: Improved Multiscale Vision Transformers for
Classification and Detection", CVPR 2022), image classification.

Follows the official ImageNet configuration (facebookresearch/mvit): pooling
attention with 3x3 depthwise-conv pooling of Q, K and V followed by LayerNorm,
Q stride 2 at each stage transition, adaptive K/V stride starting at 4,
decomposed relative position embeddings, the residual pooling connection and
channel doubling in the attention projection (``dim_mul_in_att``).

Written to trace cleanly: the input size is fixed at construction, so every
token-grid shape and every relative-position index is known then; the indices
are non-persistent buffers and nothing is cached during forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monet.models.layers import DropPath
from monet.models.registry import random_images, register

_POOL_KERNEL = 3
_POOL_PADDING = _POOL_KERNEL // 2


def _conv_output_size(
    size: tuple[int, int], kernel: int, stride: int, padding: int
) -> tuple[int, int]:
    """Grid size after a square convolution or pooling window."""
    height, width = size
    return (
        (height + 2 * padding - kernel) // stride + 1,
        (width + 2 * padding - kernel) // stride + 1,
    )


def _relative_index(query_length: int, key_length: int) -> torch.Tensor:
    """Index into a relative-position table for each (query, key) pair along one axis.

    When Q and K are pooled to different lengths, the shorter axis is scaled up
    so that distances are measured on the finer grid, as in the official code.
    """
    query_ratio = max(key_length / query_length, 1.0)
    key_ratio = max(query_length / key_length, 1.0)
    distance = (
        torch.arange(query_length)[:, None] * query_ratio
        - torch.arange(key_length)[None, :] * key_ratio
        + (key_length - 1) * key_ratio
    )
    return distance.long()


def _pool_tokens(
    tokens: torch.Tensor,
    pool: nn.Module,
    grid: tuple[int, int],
    class_token: bool,
    norm: nn.Module | None = None,
) -> torch.Tensor:
    """Pool the spatial tokens of (batch, heads, tokens, channels) over their 2-D grid.

    The class token, when present, bypasses the pooling and is put back in front.
    """
    batch, heads, _, channels = tokens.shape
    if class_token:
        cls, tokens = tokens[:, :, :1], tokens[:, :, 1:]
    tokens = tokens.reshape(batch * heads, grid[0], grid[1], channels).permute(0, 3, 1, 2)
    tokens = pool(tokens)
    tokens = tokens.reshape(batch, heads, channels, -1).transpose(2, 3)
    if class_token:
        tokens = torch.cat((cls, tokens), dim=2)
    if norm is not None:
        tokens = norm(tokens)
    return tokens


class MultiScaleAttention(nn.Module):
    """Pooling attention with decomposed relative positions and residual pooling."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_size: tuple[int, int],
        stride_q: int = 1,
        stride_kv: int = 1,
        class_token: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dim_out = dim_out
        head_dim = dim_out // num_heads
        self.scale = head_dim**-0.5
        self.class_token = class_token
        self.input_size = input_size
        self.q_size = _conv_output_size(input_size, _POOL_KERNEL, stride_q, _POOL_PADDING)
        self.kv_size = _conv_output_size(input_size, _POOL_KERNEL, stride_kv, _POOL_PADDING)

        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)

        # Pooling is shared across heads ("conv" mode): a depthwise conv over one
        # head's channels, followed by LayerNorm.
        def pooling(stride: int) -> nn.Conv2d:
            return nn.Conv2d(
                head_dim,
                head_dim,
                _POOL_KERNEL,
                stride=stride,
                padding=_POOL_PADDING,
                groups=head_dim,
                bias=False,
            )

        self.pool_q = pooling(stride_q)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.pool_k = pooling(stride_kv)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.pool_v = pooling(stride_kv)
        self.norm_v = nn.LayerNorm(head_dim, eps=1e-6)

        table_h = 2 * max(self.q_size[0], self.kv_size[0]) - 1
        table_w = 2 * max(self.q_size[1], self.kv_size[1]) - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(table_h, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(table_w, head_dim))
        nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
        nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        # Derived from the sizes alone, so rebuilt with the module rather than saved.
        self.register_buffer(
            "rel_index_h", _relative_index(self.q_size[0], self.kv_size[0]), persistent=False
        )
        self.register_buffer(
            "rel_index_w", _relative_index(self.q_size[1], self.kv_size[1]), persistent=False
        )

    def relative_position_bias(self, q: torch.Tensor) -> torch.Tensor:
        """Additive logits bias (batch, heads, q tokens, kv tokens) from rel_pos_h/w."""
        batch, heads, _, head_dim = q.shape
        q_h, q_w = self.q_size
        k_h, k_w = self.kv_size
        spatial_q = q[:, :, 1:] if self.class_token else q
        spatial_q = spatial_q.reshape(batch, heads, q_h, q_w, head_dim)
        table_h = self.rel_pos_h[self.rel_index_h]
        table_w = self.rel_pos_w[self.rel_index_w]
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", spatial_q, table_h)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", spatial_q, table_w)
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(
            batch, heads, q_h * q_w, k_h * k_w
        )
        if self.class_token:
            # The class token's row and column get no positional bias; padding
            # avoids the official code's in-place slice update.
            bias = F.pad(bias, (1, 0, 1, 0))
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = _pool_tokens(q, self.pool_q, self.input_size, self.class_token, self.norm_q)
        k = _pool_tokens(k, self.pool_k, self.input_size, self.class_token, self.norm_k)
        v = _pool_tokens(v, self.pool_v, self.input_size, self.class_token, self.norm_v)

        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = logits + self.relative_position_bias(q)
        x = logits.softmax(dim=-1) @ v
        x = x + q  # residual pooling connection
        x = x.transpose(1, 2).reshape(batch, -1, self.dim_out)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden_dim: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block with pooling attention.

    At a stage transition the attention changes the width (``dim`` to
    ``dim_out``) and pools Q with stride 2; the shortcut follows with a linear
    projection of the normalised input and a max pool.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_size: tuple[int, int],
        stride_q: int = 1,
        stride_kv: int = 1,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        class_token: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.class_token = class_token
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(
            dim, dim_out, num_heads, input_size, stride_q, stride_kv, class_token
        )
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), dim_out)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.pool_skip = (
            nn.MaxPool2d(stride_q + 1, stride_q, (stride_q + 1) // 2) if stride_q > 1 else None
        )
        self.output_size = self.attn.q_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm1(x)
        x_attention = self.attn(x_norm)
        if self.proj is not None:
            x = self.proj(x_norm)
        if self.pool_skip is not None:
            x = _pool_tokens(
                x.unsqueeze(1), self.pool_skip, self.input_size, self.class_token
            ).squeeze(1)
        x = x + self.drop_path(x_attention)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MViTv2(nn.Module):
    """MViTv2 classifier for images of a fixed size.

    ``class_token`` defaults to False as in the official ImageNet configurations
    (``CLS_EMBED_ON: False``): the head averages the final tokens. With True a
    learned class token is prepended, bypasses all pooling and feeds the head.
    """

    def __init__(
        self,
        stage_depths: Sequence[int] = (1, 2, 11, 2),
        embed_dim: int = 96,
        num_heads: int = 1,
        image_size: int | tuple[int, int] = 224,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        kv_stride: int = 4,
        mlp_ratio: float = 4.0,
        class_token: bool = False,
    ) -> None:
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.class_token = class_token
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=7, stride=4, padding=3)
        grid = _conv_output_size((height, width), kernel=7, stride=4, padding=3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None

        depth = sum(stage_depths)
        # The first block of every stage after the first is a transition:
        # Q stride 2, heads and width doubled, K/V stride halved (down to 1).
        # The halved K/V stride already applies to the transition block, which
        # pools its full-resolution input, as in the official configuration.
        transitions = {sum(stage_depths[:stage]) for stage in range(1, len(stage_depths))}
        rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        self.blocks = nn.ModuleList()
        dim = embed_dim
        for index in range(depth):
            stride_q = 1
            if index in transitions:
                stride_q = 2
                num_heads *= 2
                kv_stride = max(kv_stride // stride_q, 1)
            dim_out = 2 * dim if index in transitions else dim
            block = MultiScaleBlock(
                dim,
                dim_out,
                num_heads,
                grid,
                stride_q=stride_q,
                stride_kv=kv_stride,
                mlp_ratio=mlp_ratio,
                drop_path_rate=rates[index],
                class_token=class_token,
            )
            self.blocks.append(block)
            grid = block.output_size
            dim = dim_out

        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_weights)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features of shape (batch, final width)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.class_token else x.mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Logits; the official head's eval-time softmax is left to the loss/user.
        return self.head(self.forward_features(images))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)



@register("mvitv2_t", example_inputs=random_images(224), default_batch=4, tags=("mvit", "paper"))
def mvitv2_t(num_classes: int = 1000, drop_path_rate: float = 0.1, **overrides: Any) -> MViTv2:
    """MViTv2-T: 24M parameters, 4.7 GFLOPs at 224x224."""
    return MViTv2((1, 2, 5, 2), num_classes=num_classes, drop_path_rate=drop_path_rate, **overrides)


@register("mvitv2_s", example_inputs=random_images(224), default_batch=2, tags=("mvit", "paper"))
def mvitv2_s(num_classes: int = 1000, drop_path_rate: float = 0.1, **overrides: Any) -> MViTv2:
    """MViTv2-S: 35M parameters, 7.0 GFLOPs at 224x224."""
    return MViTv2(
        (1, 2, 11, 2), num_classes=num_classes, drop_path_rate=drop_path_rate, **overrides
    )


@register("mvitv2_b", example_inputs=random_images(224), default_batch=2, tags=("mvit", "paper"))
def mvitv2_b(num_classes: int = 1000, drop_path_rate: float = 0.3, **overrides: Any) -> MViTv2:
    """MViTv2-B: 52M parameters, 10.2 GFLOPs at 224x224."""
    return MViTv2(
        (2, 3, 16, 3), num_classes=num_classes, drop_path_rate=drop_path_rate, **overrides
    )


@register(
    "mvitv2_tiny_test",
    example_inputs=random_images(32),
    default_batch=4,
    tiny=True,
    tags=("mvit", "test"),
)
def mvitv2_tiny_test(
    num_classes: int = 10, drop_path_rate: float = 0.1, **overrides: Any
) -> MViTv2:
    """A four-stage MViTv2 small enough for unit tests (32x32 images, width 8)."""
    options: dict[str, Any] = {"embed_dim": 8, "image_size": 32}
    options.update(overrides)
    return MViTv2((1, 1, 2, 1), num_classes=num_classes, drop_path_rate=drop_path_rate, **options)
