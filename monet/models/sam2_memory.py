"""SAM 2's video memory: the memory encoder and memory attention (with 2-D RoPE).

The memory encoder fuses a frame's image features with its predicted mask
into a compact memory map; memory attention conditions the current frame's
features on a bank of such maps and on object-pointer tokens. The bank is
plain tensors passed in and out by the caller: no module holds state between
frames. Module and parameter names follow the official ``sam2.modeling``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monet.models.layers import DropPath, LayerNorm2d
from monet.models.sam2_decoder import Attention
from monet.models.sam2_layers import apply_rotary, axial_rotary_angles, sine_position_encoding


class RoPEAttention(Attention):
    """Attention with 2-D axial rotary position encoding on queries and keys.

    The rotation for the configured ``feat_sizes`` is precomputed as buffers;
    another (square) token count is handled by computing the rotation in
    forward from the shape, never by storing it. With ``rope_k_repeat`` the keys
    may span several frames of the query's size (the memory bank); the last
    ``num_k_exclude_rope`` keys (object pointers) are not rotated.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate, dropout, kv_in_dim)
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        angles = axial_rotary_angles(self.head_dim, feat_sizes[0], feat_sizes[1], rope_theta)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    @property
    def head_dim(self) -> int:
        return self.internal_dim // self.num_heads

    def rotation(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens == self.rope_cos.shape[0]:
            return self.rope_cos, self.rope_sin
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"RoPE needs a square token grid or feat_sizes, got {tokens} tokens")
        angles = axial_rotary_angles(self.head_dim, side, side, self.rope_theta, device=device)
        return angles.cos(), angles.sin()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        query = self.separate_heads(self.q_proj(q))
        key = self.separate_heads(self.k_proj(k))
        value = self.separate_heads(self.v_proj(v))
        cos, sin = self.rotation(query.shape[-2], query.device)
        num_k_rope = key.shape[-2] - num_k_exclude_rope
        if num_k_rope != query.shape[-2] and not self.rope_k_repeat:
            raise ValueError("keys longer than queries need rope_k_repeat=True")
        query = apply_rotary(query, cos, sin)
        rotated = apply_rotary(key[:, :, :num_k_rope], cos, sin)
        key = torch.cat((rotated, key[:, :, num_k_rope:]), dim=2) if num_k_exclude_rope else rotated
        return self.attend(query, key, value)


class MemoryAttentionLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the memory bank, then an MLP."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        kv_in_dim: int = 64,
        feat_sizes: tuple[int, int] = (64, 64),
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.self_attn = RoPEAttention(
            d_model, 1, dropout=dropout, rope_theta=rope_theta, feat_sizes=feat_sizes
        )
        self.cross_attn_image = RoPEAttention(
            d_model,
            1,
            dropout=dropout,
            kv_in_dim=kv_in_dim,
            rope_theta=rope_theta,
            rope_k_repeat=True,
            feat_sizes=feat_sizes,
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        target: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        normed = self.norm1(target)
        target = target + self.dropout1(self.self_attn(normed, normed, normed))
        normed = self.norm2(target)
        # Released configs add the position encoding to the memory keys only.
        attended = self.cross_attn_image(
            normed, memory + memory_pos, memory, num_k_exclude_rope=num_k_exclude_rope
        )
        target = target + self.dropout2(attended)
        normed = self.norm3(target)
        hidden = self.dropout(F.relu(self.linear1(normed)))
        return target + self.dropout3(self.linear2(hidden))


class MemoryAttention(nn.Module):
    """A stack of :class:`MemoryAttentionLayer` with a final LayerNorm (batch first)."""

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 4,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        kv_in_dim: int = 64,
        feat_sizes: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, dim_feedforward, dropout, kv_in_dim, feat_sizes)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        current: torch.Tensor,
        memory: torch.Tensor,
        current_pos: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """``current``/``current_pos``: ``(B, HW, d_model)``; ``memory``/``memory_pos``:
        ``(B, T*HW + num_obj_ptr_tokens, kv_in_dim)``. Returns ``(B, HW, d_model)``."""
        output = current + 0.1 * current_pos
        for layer in self.layers:
            output = layer(output, memory, memory_pos, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(output)


class MaskDownSampler(nn.Module):
    """Strided conv + LayerNorm + GELU steps from a mask to ``embed_dim`` channels."""

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        total_stride: int = 16,
    ) -> None:
        super().__init__()
        num_layers = round(math.log(total_stride, stride))
        if stride**num_layers != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        self.encoder = nn.Sequential()
        in_channels = 1
        for _ in range(num_layers):
            # Each step trades stride**2 resolution for as many channels.
            out_channels = in_channels * stride**2
            self.encoder.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding))
            self.encoder.append(LayerNorm2d(out_channels))
            self.encoder.append(nn.GELU())
            in_channels = out_channels
        self.encoder.append(nn.Conv2d(in_channels, embed_dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, LayerNorm, pointwise MLP, layer scale."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        drop_path: float = 0.0,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        x = self.gamma * self.pwconv2(self.act(self.pwconv1(x)))
        return residual + self.drop_path(x.permute(0, 3, 1, 2))


class Fuser(nn.Module):
    """A stack of :class:`CXBlock` applied to the mask-augmented features."""

    def __init__(self, dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.proj = nn.Identity()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Image features + (scaled sigmoid) mask logits -> memory features and their position code."""

    def __init__(self, out_dim: int = 64, in_dim: int = 256, fuser_layers: int = 2) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, fuser_layers)
        self.out_proj = (
            nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        )
        self.out_dim = out_dim

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pix_feat`` ``(B, in_dim, H, W)`` and ``masks`` ``(B, 1, 16H, 16W)``, already
        mapped through the sigmoid; returns features and position code, each ``(B, out_dim, H, W)``."""
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        position = sine_position_encoding(x.shape[-2], x.shape[-1], self.out_dim, x.device, x.dtype)
        return x, position.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
