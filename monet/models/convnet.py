"""A ResNet-style ConvNet: convolutions, batch-norm in training mode, ReLU, pooling, residuals.

Basic residual blocks (He et al., 2016) with a max-pooled stem and a global
average-pooled linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from monet.models.registry import random_images, register


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        )
        layers, channels = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                layers.append(BasicBlock(channels, width, 2 if j == 0 and i > 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(images))
        return self.head(x.mean(dim=(2, 3)))


@register("resnet18", example_inputs=random_images(224), default_batch=8, tags=("convnet",))
def resnet18(**overrides) -> ResNet:
    """ResNet-18 (11.7M parameters) at 224²."""
    return ResNet(**overrides)


@register("resnet_tiny_test", example_inputs=random_images(32), default_batch=2, tiny=True,
          tags=("convnet",))
def resnet_tiny_test(**overrides) -> ResNet:
    """Two stages of one block each at 32²: for unit tests."""
    config = {"widths": (8, 16), "blocks": (1, 1), "num_classes": 10}
    return ResNet(**{**config, **overrides})
