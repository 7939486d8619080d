"""Small layers shared by several models: stochastic depth and channels-first LayerNorm.

Both trace cleanly into one aten graph: drop path draws its mask with a random
op (``bernoulli``) so it appears in the captured graph, and the LayerNorm is
one fused aten op. This module registers no model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    # One draw per sample, broadcast over the other dimensions; scaling the small
    # mask rather than ``x`` keeps the rescale off the activation-sized tensor.
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob).div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth per sample, inactive in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor ("channels first").

    The official code spells the normalisation out in elementwise ops; permuting
    around ``layer_norm`` computes the same thing as one fused aten op, which
    keeps the captured graph small. Parameter names (``weight``, ``bias``) are
    the official ones.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
