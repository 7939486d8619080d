"""Shared fixtures: a private profile cache and small models for the pipeline tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monet.models.convnet import BasicBlock


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Tests never read or write the user's profile cache.
    monkeypatch.setenv("MONET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "monet-cache"))


class SmallConvNet(nn.Module):
    """Conv stem, residual blocks with batch-norm, a max-pool, more blocks, a linear head."""

    def __init__(self, width: int = 16, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = nn.Sequential(*(BasicBlock(width, width, 1) for _ in range(blocks)))
        self.pool = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(*(BasicBlock(width, width, 1) for _ in range(blocks)))
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.pool(self.stage1(self.stem(images))))
        return self.head(x.mean(dim=(2, 3)))


def small_vit():
    from monet.models import create

    return create("vit_tiny_test", image_size=32, depth=4, dropout=0.1)


MODELS = {
    "vit": (small_vit, (16, 3, 32, 32)),
    "convnet": (lambda: SmallConvNet(blocks=4), (8, 3, 32, 32)),
}
