"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022), image classification.

Written to trace cleanly into one aten graph: no data-dependent control flow,
nothing cached on modules during forward, and stochastic depth drawn with a
random op (``bernoulli``) so it appears in the captured graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monet.models.layers import DropPath, LayerNorm2d
from monet.models.registry import random_images, register


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, inverted MLP (4x), layer scale, drop-path residual."""

    def __init__(
        self, dim: int, drop_path_rate: float = 0.0, layer_scale_init: float = 1e-6
    ) -> None:
        super().__init__()
        self.depthwise_conv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.expand = nn.Linear(dim, 4 * dim)
        self.activation = nn.GELU()
        self.project = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.depthwise_conv(x)
        # The MLP runs channels-last so the pointwise convs are plain Linear layers.
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.expand(x)
        x = self.activation(x)
        x = self.project(x)
        x = x * self.layer_scale
        x = x.permute(0, 3, 1, 2)
        return residual + self.drop_path(x)


class ConvNeXt(nn.Module):
    """ConvNeXt classifier: patchify stem, four stages with downsampling, pooled head."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} differ in length")
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4),
                LayerNorm2d(dims[0], eps=1e-6),
            )
        )
        for stage in range(1, len(dims)):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[stage - 1], eps=1e-6),
                    nn.Conv2d(dims[stage - 1], dims[stage], kernel_size=2, stride=2),
                )
            )

        # Stochastic depth grows linearly with block index over the whole network.
        total_blocks = sum(depths)
        rates = [drop_path_rate * index / max(total_blocks - 1, 1) for index in range(total_blocks)]
        self.stages = nn.ModuleList()
        first = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(
                nn.Sequential(
                    *(
                        ConvNeXtBlock(dim, rates[first + index], layer_scale_init)
                        for index in range(depth)
                    )
                )
            )
            first += depth

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(_init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features of shape (batch, dims[-1])."""
        x = images
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x.mean(dim=(-2, -1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)



@register("convnext_t", example_inputs=random_images(224), default_batch=4, tags=("convnext", "paper"))
def convnext_t(num_classes: int = 1000, drop_path_rate: float = 0.1, **overrides: Any) -> ConvNeXt:
    """ConvNeXt-T: 28.6M parameters, 4.5 GFLOPs at 224x224."""
    return ConvNeXt(
        (3, 3, 9, 3), (96, 192, 384, 768), num_classes, drop_path_rate=drop_path_rate, **overrides
    )


@register("convnext_s", example_inputs=random_images(224), default_batch=2, tags=("convnext", "paper"))
def convnext_s(num_classes: int = 1000, drop_path_rate: float = 0.4, **overrides: Any) -> ConvNeXt:
    """ConvNeXt-S: 50M parameters, 8.7 GFLOPs at 224x224."""
    return ConvNeXt(
        (3, 3, 27, 3), (96, 192, 384, 768), num_classes, drop_path_rate=drop_path_rate, **overrides
    )


@register("convnext_b", example_inputs=random_images(224), default_batch=2, tags=("convnext", "paper"))
def convnext_b(num_classes: int = 1000, drop_path_rate: float = 0.5, **overrides: Any) -> ConvNeXt:
    """ConvNeXt-B: 89M parameters, 15.4 GFLOPs at 224x224."""
    return ConvNeXt(
        (3, 3, 27, 3),
        (128, 256, 512, 1024),
        num_classes,
        drop_path_rate=drop_path_rate,
        **overrides,
    )


@register(
    "convnext_tiny_test",
    example_inputs=random_images(32),
    default_batch=4,
    tiny=True,
    tags=("convnext", "test"),
)
def convnext_tiny_test(
    num_classes: int = 10, drop_path_rate: float = 0.1, **overrides: Any
) -> ConvNeXt:
    """A four-stage ConvNeXt small enough for unit tests (32x32 images, 10 classes)."""
    return ConvNeXt(
        (1, 1, 2, 1), (8, 16, 32, 64), num_classes, drop_path_rate=drop_path_rate, **overrides
    )
