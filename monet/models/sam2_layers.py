"""Small layers and position encodings shared by the SAM 2 modules.

Drop path and the channels-first LayerNorm are in :mod:`monet.models.layers`.

Every position encoding here is a pure function of shapes (and, for the random
Fourier features, of a buffer): nothing is cached on a module during forward,
so a captured graph never sees a tensor left over from another trace.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """A stack of linear layers with an activation between them (SAM's ``MLP``)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out)
            for fan_in, fan_out in zip([input_dim] + hidden, hidden + [output_dim])
        )
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


def sine_position_encoding(
    height: int,
    width: int,
    channels: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """DETR-style normalised 2-D sine encoding of a grid, shape ``(channels, height, width)``.

    Same values as the official ``PositionEmbeddingSine(channels, normalize=True)``:
    the first half of the channels encodes rows, the second half columns, with
    sines and cosines interleaved.
    """
    if channels % 4:
        raise ValueError(f"sine position encoding needs channels divisible by 4, got {channels}")
    features = channels // 2
    scale, eps = 2 * math.pi, 1e-6
    rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    columns = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    rows = rows / (height + eps) * scale
    columns = columns / (width + eps) * scale
    frequency = torch.arange(features, dtype=torch.float32, device=device)
    frequency = temperature ** (2 * torch.div(frequency, 2, rounding_mode="floor") / features)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] / frequency
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    row_code = encode(rows)[:, None, :].expand(height, width, features)
    column_code = encode(columns)[None, :, :].expand(height, width, features)
    return torch.cat((row_code, column_code), dim=2).permute(2, 0, 1).to(dtype)


def sine_encoding_1d(
    positions: torch.Tensor, channels: int, temperature: float = 10000.0
) -> torch.Tensor:
    """1-D sine/cosine encoding of ``positions`` (any shape), last dim ``channels``."""
    half = channels // 2
    frequency = torch.arange(half, dtype=torch.float32, device=positions.device)
    frequency = temperature ** (2 * torch.div(frequency, 2, rounding_mode="floor") / half)
    angles = positions.to(torch.float32).unsqueeze(-1) / frequency
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def axial_rotary_angles(
    head_dim: int,
    width: int,
    height: int,
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotation angles of 2-D axial RoPE, shape ``(height * width, head_dim // 2)``.

    Token ``i`` sits at column ``i % width`` and row ``i // width``; the first
    quarter of the channel pairs rotate with the column, the next with the row,
    as in the official ``compute_axial_cis`` (which returns ``exp(i * angles)``).
    """
    frequency = 1.0 / (
        theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim)
    )
    tokens = torch.arange(width * height, dtype=torch.float32, device=device)
    column = tokens % width
    row = torch.div(tokens, width, rounding_mode="floor")
    return torch.cat((torch.outer(column, frequency), torch.outer(row, frequency)), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2j, 2j+1)`` of ``x`` (..., tokens, dim) by the given angles.

    Real arithmetic instead of the official complex multiply: complex tensors
    do not trace through AOTAutograd everywhere, and the result is the same.
    ``cos``/``sin`` have shape ``(tokens, dim // 2)`` and repeat along the tokens
    when ``x`` has a whole multiple of them (several memory frames).
    """
    tokens = x.shape[-2]
    if tokens == 0:
        return x
    repeats = tokens // cos.shape[0]
    if repeats * cos.shape[0] != tokens:
        raise ValueError(f"{tokens} tokens are not a multiple of {cos.shape[0]} rotary positions")
    if repeats > 1:
        cos = cos.repeat(repeats, 1)
        sin = sin.repeat(repeats, 1)
    pairs = x.unflatten(-1, (-1, 2))
    real, imaginary = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imaginary * sin, real * sin + imaginary * cos), dim=-1)
    return rotated.flatten(-2)
