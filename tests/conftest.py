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


def step_with_loss(module, x, seed: int) -> torch.Tensor:
    """One forward and backward on a fixed seed (dropout draws the same masks)."""
    torch.manual_seed(seed)
    out = module(x)
    (out.float().square().mean() + out.sum()).backward()
    return out.detach()


def assert_same_step(optimized, model, reference, x, close: dict, reference_context=None):
    """One step of ``optimized`` (wrapping ``model``) and of ``reference`` on input ``x``:
    outputs, the input's gradient, parameter gradients and buffers agree within ``close``."""
    import contextlib

    out = step_with_loss(optimized, x, seed=1)
    grad_x = None if x.grad is None else x.grad.clone()
    x.grad = None
    with reference_context or contextlib.nullcontext():
        expected = step_with_loss(reference, x, seed=1)
    torch.testing.assert_close(out, expected, **close)
    if x.requires_grad:
        torch.testing.assert_close(grad_x, x.grad, **close)
    for (param_name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **close, msg=param_name)
    for (buffer_name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, **close, msg=buffer_name)
