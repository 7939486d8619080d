"""ConvNeXt: paper sizes and FLOPs, a tiny training step, capture by AOTAutograd."""

from __future__ import annotations

import pytest
import torch
from zoo_counts import aten_targets, count_flops, count_parameters, gradient_slots

import monet.models
from monet.capture import capture
from monet.models.convnext import ConvNeXt

# (name, parameters in millions, GFLOPs at 224x224 counting a multiply-add once)
PAPER = [
    ("convnext_t", 28.6, 4.5),
    ("convnext_s", 50.0, 8.7),
    ("convnext_b", 89.0, 15.4),
]


@pytest.mark.parametrize(("name", "million_parameters", "gflops"), PAPER)
def test_paper_config_size_and_flops(name: str, million_parameters: float, gflops: float) -> None:
    with torch.device("meta"):
        model = monet.models.create(name).eval()
        images = torch.empty(1, 3, 224, 224)
    assert count_parameters(model) / 1e6 == pytest.approx(million_parameters, rel=0.02)
    assert count_flops(model, images) / 1e9 == pytest.approx(gflops, rel=0.02)


def test_registry_entries_and_overrides() -> None:
    assert {"convnext_t", "convnext_s", "convnext_b"} <= set(monet.models.names(tiny=False))
    assert "convnext_tiny_test" in monet.models.names(tiny=True)
    model = monet.models.create("convnext_tiny_test", num_classes=7, drop_path_rate=0.0)
    assert isinstance(model, ConvNeXt)
    assert model.head.out_features == 7
    assert all(block.drop_path.drop_prob == 0.0 for stage in model.stages for block in stage)


def test_drop_path_grows_linearly() -> None:
    model = monet.models.create("convnext_tiny_test", drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob for stage in model.stages for block in stage]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.3)
    assert rates == sorted(rates)


@pytest.mark.parametrize("training", [True, False])
def test_tiny_forward_backward(training: bool) -> None:
    torch.manual_seed(0)
    model = monet.models.create("convnext_tiny_test").train(training)
    (images,) = monet.models.example_inputs("convnext_tiny_test", batch=4)
    logits = model(images)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_drop_path_random_in_training_only() -> None:
    torch.manual_seed(0)
    model = monet.models.create("convnext_tiny_test", drop_path_rate=0.9)
    # Layer scale at 1e-6 would hide dropped branches; make them visible.
    for stage in model.stages:
        for block in stage:
            torch.nn.init.ones_(block.layer_scale)
    (images,) = monet.models.example_inputs("convnext_tiny_test", batch=4)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))
        model.eval()
        assert torch.equal(model(images), model(images))


def test_tiny_training_step_captured_as_one_joint_graph() -> None:
    torch.manual_seed(0)
    model = monet.models.create("convnext_tiny_test")
    (images,) = monet.models.example_inputs("convnext_tiny_test", batch=2)
    joint = capture(model, images)
    targets = aten_targets(joint.module)
    assert "aten.convolution_backward.default" in targets
    assert any(target.startswith("aten.native_layer_norm_backward") for target in targets)
    assert any("bernoulli" in target for target in targets), "drop-path's random op is missing"
    gradients = gradient_slots(joint)
    assert all(gradients[f"parameter:{name}"] is not None for name, _ in model.named_parameters())
