"""SAM 2's image encoder: the Hiera trunk ("hieradet") and the FPN neck.

Hiera (Ryali et al., 2023) as SAM 2 uses it: a 4-stage hierarchical ViT with
windowed attention inside stages, global attention in a few configured blocks,
and query max-pooling ("mask-unit" pooling) at the first block of each new
stage, which halves the resolution and doubles the width. The position
embedding is a background embedding interpolated to the token grid plus a
window embedding tiled over it (Bolya et al., 2023, "Window attention is bugged").
Module and parameter names follow the official ``sam2.modeling.backbones``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monet.models.layers import DropPath
from monet.models.sam2_layers import MLP


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``(B, H, W, C)`` into ``(B * windows, window, window, C)``, zero-padding H and W."""
    batch, height, width, channels = x.shape
    pad_height = (window - height % window) % window
    pad_width = (window - width % window) % window
    if pad_height or pad_width:
        x = F.pad(x, (0, 0, 0, pad_width, 0, pad_height))
    padded_height, padded_width = height + pad_height, width + pad_width
    x = x.view(batch, padded_height // window, window, padded_width // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)
    return windows, (padded_height, padded_width)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: back to ``(B, H, W, C)`` without the padding."""
    padded_height, padded_width = padded_size
    height, width = size
    batch = windows.shape[0] // ((padded_height // window) * (padded_width // window))
    x = windows.reshape(batch, padded_height // window, padded_width // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_height, padded_width, -1)
    if padded_height > height or padded_width > width:
        x = x[:, :height, :width, :]
    return x


def pool_channels_last(x: torch.Tensor, pool: nn.Module | None) -> torch.Tensor:
    """Apply an NCHW pooling module to a ``(B, H, W, C)`` tensor."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution to tokens, channels last."""

    def __init__(self, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries are optionally max-pooled."""

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        query, key, value = torch.unbind(qkv, 2)
        if self.q_pool is not None:
            # Pooling the queries (not keys/values) is what shrinks the token grid.
            query = pool_channels_last(query.reshape(batch, height, width, -1), self.q_pool)
            height, width = query.shape[1:3]
            query = query.reshape(batch, height * width, self.num_heads, -1)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block; at a stage change it pools and widens."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            # The residual path must change width and resolution like the attention path.
            shortcut = pool_channels_last(self.proj(x), self.pool)

        window = self.window_size
        height, width = x.shape[1], x.shape[2]
        if window > 0:
            x, padded_size = window_partition(x, window)
        x = self.attn(x)
        if self.q_stride:
            # Pooling shrank every window; the output grid is the pooled shortcut's.
            window = self.window_size // self.q_stride[0]
            height, width = shortcut.shape[1:3]
            pad_height = (window - height % window) % window if window > 0 else 0
            pad_width = (window - width % window) % window if window > 0 else 0
            padded_size = (height + pad_height, width + pad_width)
        if self.window_size > 0:
            x = window_unpartition(x, window, padded_size, (height, width))

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Hiera(nn.Module):
    """The Hiera trunk; returns the feature map of every stage, highest resolution first."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        stages: Sequence[int] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] = (12, 16, 20),
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError("stages and window_spec need one entry per stage")
        depth = sum(stages)
        self.stage_ends = [sum(stages[:index]) - 1 for index in range(1, len(stages) + 1)]
        if not 0 <= q_pool <= len(self.stage_ends) - 1:
            raise ValueError(f"q_pool={q_pool} exceeds the number of stage transitions")
        q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.window_spec = tuple(window_spec)
        self.global_att_blocks = tuple(global_att_blocks)

        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(
            torch.zeros(1, embed_dim, window_spec[0], window_spec[0])
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_window, std=0.02)

        rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        stage = 1
        self.blocks = nn.ModuleList()
        for index in range(depth):
            dim_out = embed_dim
            # The window size lags a block behind the stage: the first block of a
            # stage attends in the previous stage's windows, then pools them.
            window_size = self.window_spec[stage - 1]
            if index in self.global_att_blocks:
                window_size = 0
            if index - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=embed_dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    drop_path=rates[index],
                    q_stride=q_stride if index in q_pool_blocks else None,
                    window_size=window_size,
                )
            )
            embed_dim = dim_out
        self.channel_list = [self.blocks[end].dim_out for end in self.stage_ends[::-1]]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Background embedding interpolated to the grid plus the tiled window embedding.

        A differentiable function of the two parameters, so it is evaluated in
        every forward (nothing is stored); only the sizes come from the input shape.
        """
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        window = self.pos_embed_window.shape[-1]
        tiled = self.pos_embed_window.tile(1, 1, height // window, width // window)
        return (background + tiled).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class FpnNeck(nn.Module):
    """SAM 2's FPN: 1x1 lateral convs to ``d_model`` and nearest top-down fusion.

    Only the levels in ``fpn_top_down_levels`` receive the upsampled coarser
    level (the released configs fuse the two coarsest). Position encodings are
    not produced here: they depend only on shapes, and the model computes them
    where it needs them.
    """

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: Sequence[int],
        fpn_top_down_levels: Sequence[int] | None = None,
        fpn_interp_model: str = "nearest",
    ) -> None:
        super().__init__()
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for channels in backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(channels, d_model, kernel_size=1))
            self.convs.append(lateral)
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)
        self.fpn_interp_model = fpn_interp_model

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        last = len(self.convs) - 1
        outputs: list[torch.Tensor] = [features[0]] * len(features)
        previous: torch.Tensor | None = None
        for level in range(last, -1, -1):
            lateral = self.convs[last - level](features[level])
            if level in self.fpn_top_down_levels and previous is not None:
                align = None if self.fpn_interp_model == "nearest" else False
                top_down = F.interpolate(
                    previous, scale_factor=2.0, mode=self.fpn_interp_model, align_corners=align
                )
                previous = lateral + top_down
            else:
                previous = lateral
            outputs[level] = previous
        return outputs


class ImageEncoder(nn.Module):
    """Trunk then neck; ``scalp`` drops that many of the coarsest levels."""

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(
                f"trunk channels {trunk.channel_list} differ from neck {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """FPN feature maps at strides 4, 8, 16 (with ``scalp=1``), highest resolution first."""
        features = self.neck(self.trunk(image))
        return features[: len(features) - self.scalp] if self.scalp > 0 else features
