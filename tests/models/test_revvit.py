"""Rev-ViT: paper sizes, reversible gradients, flat activation memory, AOTAutograd capture."""

from __future__ import annotations

import pytest
import torch
from torch._functorch.partitioners import default_partition
from zoo_counts import count_flops, count_parameters

import monet
import monet.models
from monet.capture import capture
from monet.measure import measure_peak_memory, resident_tensors
from monet.models.revvit import RevViT

# Paper, Table 1 (Rev-ViT-S, Rev-ViT-B): parameters and GFLOPs, a multiply-add counted once.
PAPER = {"revvit_s": (22e6, 4.6e9), "revvit_b": (87e6, 17.6e9)}


def tiny(depth: int = 2, reversible: bool = True, **overrides) -> RevViT:
    torch.manual_seed(0)
    return monet.models.create("revvit_tiny_test", reversible=reversible, depth=depth, **overrides)


def saved_values(model: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.fx.Node]:
    """The non-parameter values the forward of one captured step saves for the backward."""
    joint = capture(model, *inputs)
    forward, _ = default_partition(joint.module, None, num_fwd_outputs=joint.num_forward_outputs)
    output = next(node for node in forward.graph.nodes if node.op == "output")
    return [
        value
        for value in output.args[0][joint.num_forward_outputs :]
        if not value.name.startswith("primals")
    ]


def peak_step_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Peak memory of one forward+backward above the parameters, gradients and input.

    Gradients are allocated beforehand, so accumulation is in place and the
    figure is activations plus temporaries.
    """
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    resident = resident_tensors(model, images)
    return measure_peak_memory(lambda: model(images).sum().backward(), resident).delta_bytes


def test_registered():
    assert {"revvit_s", "revvit_b"} <= set(monet.models.names(tiny=False))
    assert "revvit_tiny_test" in monet.models.names(tiny=True)
    (images,) = monet.models.example_inputs("revvit_tiny_test", batch=3)
    assert tiny()(images).shape == (3, 10)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameters_and_flops(name):
    paper_parameters, paper_flops = PAPER[name]
    with torch.device("meta"):
        model = monet.models.create(name)
        images = torch.empty(1, 3, 224, 224)
    assert count_parameters(model) == pytest.approx(paper_parameters, rel=0.02)
    assert count_flops(model, images) == pytest.approx(paper_flops, rel=0.02)


def test_reversible_gradients_equal_twin_float64():
    reversible = tiny(depth=3).double()
    twin = reversible.twin()
    assert not twin.reversible
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    twin_images = images.detach().clone().requires_grad_()
    output, twin_output = reversible(images), twin(twin_images)
    torch.testing.assert_close(output, twin_output, rtol=1e-12, atol=1e-14)
    # A loss that weighs every logit differently, so no gradient is trivially symmetric.
    weights = torch.randn_like(output)
    (output * weights).sum().backward()
    (twin_output * weights).sum().backward()
    torch.testing.assert_close(images.grad, twin_images.grad, rtol=1e-10, atol=1e-14)
    for (name, parameter), twin_parameter in zip(reversible.named_parameters(), twin.parameters()):
        assert parameter.grad is not None, name
        torch.testing.assert_close(
            parameter.grad, twin_parameter.grad, rtol=1e-10, atol=1e-14, msg=name
        )


def test_no_grad_forward_matches():
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
    torch.testing.assert_close(model(images).detach(), plain)


def test_activation_memory_flat_in_depth():
    # Many tokens and a narrow width, so activations dwarf the block parameters
    # (the reversible backward hands back all block gradients at once).
    images = torch.randn(8, 3, 64, 64)
    peaks: dict[bool, list[int]] = {True: [], False: []}
    block_bytes = []
    for depth in (2, 4, 8):
        model = tiny(depth, image_size=64, patch_size=4)
        block_bytes.append(sum(p.numel() * p.element_size() for p in model.blocks.parameters()))
        peaks[True].append(peak_step_bytes(model, images))
        peaks[False].append(peak_step_bytes(model.twin(), images))
    reversible, twin = peaks[True], peaks[False]
    assert reversible[2] < 1.1 * reversible[0]
    # What grows is exactly one transient copy of the block parameters' gradients.
    activations = [peak - block for peak, block in zip(reversible, block_bytes)]
    assert max(activations) < 1.02 * min(activations)
    # The twin stores every block's activations: peak grows linearly with depth.
    per_block = (twin[1] - twin[0]) / 2
    assert per_block > 0.1 * twin[0]
    assert twin[2] - twin[1] == pytest.approx(4 * per_block, rel=0.1)
    assert reversible[2] < 0.5 * twin[2]


@pytest.mark.parametrize("reversible", [True, False], ids=["reversible", "twin"])
def test_capture_matches_eager(reversible):
    model = tiny(depth=2, reversible=reversible).double()
    eager = model.twin(reversible=False)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    joint = capture(model, images).module
    # The compiled step: a keep-everything plan run through AOTAutograd.
    monet.optimize(model, 1.0, (images,), measure=False)(images).sum().backward()
    eager(images).sum().backward()
    layer_norms = sum(
        node.target == torch.ops.aten.native_layer_norm.default for node in joint.graph.nodes
    )
    # Two per block and the head's; the reversible backward recomputes F's and G's.
    assert layer_norms == (4 + 4 + 1 if reversible else 4 + 1)
    for (name, parameter), eager_parameter in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(
            parameter.grad, eager_parameter.grad, rtol=1e-10, atol=1e-14, msg=name
        )


def test_captured_reversible_step_saves_constant_values():
    saved = {}
    for depth in (2, 4):
        values = saved_values(tiny(depth=depth), torch.randn(2, 3, 32, 32))
        saved[depth] = [tuple(value.meta["val"].shape) for value in values]
    assert saved[2] == saved[4]
    twin_values = saved_values(tiny(depth=2, reversible=False), torch.randn(2, 3, 32, 32))
    assert len(twin_values) > 3 * len(saved[2])
