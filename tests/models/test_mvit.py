"""MViTv2: paper sizes and FLOPs, a tiny training step, capture by AOTAutograd."""

from __future__ import annotations

import pytest
import torch
from zoo_counts import aten_targets, count_flops, count_parameters, gradient_slots

import monet.models
from monet.capture import capture
from monet.models.mvit import MultiScaleBlock, MViTv2

# (name, parameters in millions, GFLOPs at 224x224 counting a multiply-add once)
PAPER = [
    ("mvitv2_t", 24.0, 4.7),
    ("mvitv2_s", 35.0, 7.0),
    ("mvitv2_b", 52.0, 10.2),
]


@pytest.mark.parametrize(("name", "million_parameters", "gflops"), PAPER)
def test_paper_config_size_and_flops(name: str, million_parameters: float, gflops: float) -> None:
    with torch.device("meta"):
        model = monet.models.create(name).eval()
        images = torch.empty(1, 3, 224, 224)
    assert count_parameters(model) / 1e6 == pytest.approx(million_parameters, rel=0.02)
    assert count_flops(model, images) / 1e9 == pytest.approx(gflops, rel=0.02)


def test_paper_schedule_of_strides_heads_and_widths() -> None:
    with torch.device("meta"):
        model = monet.models.create("mvitv2_t")
    blocks: list[MultiScaleBlock] = list(model.blocks)
    # Stages 1, 2, 5, 2: transitions at blocks 1, 3 and 8.
    assert [block.attn.q_size for block in blocks] == [(56, 56)] + [(28, 28)] * 2 + [
        (14, 14)
    ] * 5 + [(7, 7)] * 2
    # K/V stride 4, 2, 1, 1 by stage, halved at the transition block itself (as
    # the official code does), which then pools its full-resolution input.
    kv_sizes = [(14, 14), (28, 28), (14, 14), (28, 28)] + [(14, 14)] * 5 + [(7, 7)]
    assert [block.attn.kv_size for block in blocks] == kv_sizes
    assert [block.attn.num_heads for block in blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 8, 8]
    assert [block.attn.dim_out for block in blocks] == [96, 192, 192] + [384] * 5 + [768] * 2
    assert [block.pool_skip is not None for block in blocks] == [
        index in (1, 3, 8) for index in range(10)
    ]


def test_registry_entries_and_overrides() -> None:
    assert {"mvitv2_t", "mvitv2_s", "mvitv2_b"} <= set(monet.models.names(tiny=False))
    assert "mvitv2_tiny_test" in monet.models.names(tiny=True)
    model = monet.models.create("mvitv2_tiny_test", num_classes=7, drop_path_rate=0.0)
    assert isinstance(model, MViTv2)
    assert model.head.out_features == 7
    assert all(block.drop_path.drop_prob == 0.0 for block in model.blocks)


@pytest.mark.parametrize(("training", "class_token"), [(True, False), (False, False), (True, True)])
def test_tiny_forward_backward(training: bool, class_token: bool) -> None:
    torch.manual_seed(0)
    model = monet.models.create("mvitv2_tiny_test", class_token=class_token).train(training)
    (images,) = monet.models.example_inputs("mvitv2_tiny_test", batch=4)
    logits = model(images)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_drop_path_random_in_training_only() -> None:
    torch.manual_seed(0)
    model = monet.models.create("mvitv2_tiny_test", drop_path_rate=0.9)
    (images,) = monet.models.example_inputs("mvitv2_tiny_test", batch=4)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))
        model.eval()
        assert torch.equal(model(images), model(images))


def test_tiny_training_step_captured_as_one_joint_graph() -> None:
    torch.manual_seed(0)
    model = monet.models.create("mvitv2_tiny_test")
    (images,) = monet.models.example_inputs("mvitv2_tiny_test", batch=2)
    joint = capture(model, images)
    targets = aten_targets(joint.module)
    assert "aten.convolution_backward.default" in targets
    assert "aten._softmax_backward_data.default" in targets
    assert any("bernoulli" in target for target in targets), "drop-path's random op is missing"
    gradients = gradient_slots(joint)
    assert all(gradients[f"parameter:{name}"] is not None for name, _ in model.named_parameters())
