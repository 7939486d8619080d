"""The registry of models by name: ``create("convnext_t")``, ``names()``."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model configuration and feed it."""

    name: str
    """Registry name, e.g. ``"convnext_t"``."""
    build: Callable[..., nn.Module]
    """Builds the model; keyword arguments override the configuration."""
    example_inputs: Callable[[int], tuple[Any, ...]]
    """Given a batch size, random example inputs for one training step."""
    default_batch: int = 2
    """A batch size that makes a step of a few seconds on a 2-core CPU."""
    tiny: bool = False
    """True for the small configurations the unit tests use."""
    tags: tuple[str, ...] = field(default_factory=tuple)
    """Free-form labels: the family (``"convnext"``), ``"paper"`` configs, etc."""


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(
    name: str,
    example_inputs: Callable[[int], tuple[Any, ...]],
    default_batch: int = 2,
    tiny: bool = False,
    tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder function under ``name``."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, build, example_inputs, default_batch, tiny, tuple(tags))
        return build

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("monet.models")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "registry":
            importlib.import_module(f"monet.models.{module.name}")
    _loaded = True


def random_images(size: int) -> Callable[[int], tuple[torch.Tensor]]:
    """Example inputs for image models: a batch of random RGB images of ``size`` x ``size``."""

    def make(batch: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, size, size),)

    return make


def names(tiny: bool | None = None) -> list[str]:
    """Registered model names, sorted; ``tiny=True``/``False`` filters by size."""
    _load_all()
    return sorted(n for n, s in _REGISTRY.items() if tiny is None or s.tiny == tiny)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}") from None


def create(name: str, **overrides: Any) -> nn.Module:
    """Build the model registered under ``name`` (random initialisation)."""
    return spec(name).build(**overrides)


def example_inputs(name: str, batch: int | None = None, seed: int = 0) -> tuple[Any, ...]:
    """Random example inputs for ``name`` at ``batch`` (its default when None)."""
    s = spec(name)
    torch.manual_seed(seed)
    return s.example_inputs(s.default_batch if batch is None else batch)
