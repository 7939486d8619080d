"""SAM 2: released sizes, tiny image and video training steps, capture by AOTAutograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo_counts import aten_targets, count_parameters, gradient_slots

import monet.models
from monet.capture import capture
from monet.models.sam2 import SAM2
from monet.models.sam2_layers import apply_rotary, axial_rotary_angles

# Parameters of the released SAM 2.1 checkpoints, in millions.
RELEASED = [
    ("sam2_hiera_t", 38.9),
    ("sam2_hiera_s", 46.0),
    ("sam2_hiera_b_plus", 80.8),
    ("sam2_hiera_l", 224.4),
]

# Used only by the video step (memory bank, object pointers, mask-input frames).
VIDEO_ONLY = (
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
)
# The released configs add the no-memory embedding directly, so this one never trains.
UNUSED = ("no_mem_pos_enc",)


def tiny_model() -> SAM2:
    torch.manual_seed(0)
    model = monet.models.create("sam2_tiny_test")
    assert isinstance(model, SAM2)
    return model.train()


def segmentation_loss(
    masks: torch.Tensor, iou: torch.Tensor, object_scores: torch.Tensor
) -> torch.Tensor:
    """SAM 2's loss terms in miniature: mask BCE, IoU regression, object presence."""
    target = (torch.rand_like(masks) > 0.5).float()
    return (
        F.binary_cross_entropy_with_logits(masks, target)
        + F.mse_loss(iou, torch.rand_like(iou))
        + F.binary_cross_entropy_with_logits(object_scores, torch.ones_like(object_scores))
    )


def names_without_gradient(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.grad is None}


@pytest.mark.parametrize(("name", "million_parameters"), RELEASED)
def test_released_parameter_counts(name: str, million_parameters: float) -> None:
    with torch.device("meta"):
        model = monet.models.create(name)
    assert count_parameters(model) / 1e6 == pytest.approx(million_parameters, rel=0.02)


def test_paper_configs_trace_at_1024_on_meta() -> None:
    """Window padding (B+ windows of 14 on a 64x64 grid) and pooling fit at full size."""
    with torch.device("meta"):
        model = monet.models.create("sam2_hiera_b_plus").eval()
        image, points, labels = monet.models.example_inputs("sam2_hiera_b_plus", batch=1)
        masks, iou, object_scores = model(image.to("meta"), points.to("meta"), labels.to("meta"))
    assert masks.shape == (1, 1, 1024, 1024)
    assert iou.shape == (1, 1) and object_scores.shape == (1, 1)


def test_registry_entries() -> None:
    names = set(monet.models.names())
    assert {spec for spec, _ in RELEASED} <= names
    assert "sam2_tiny_test" in monet.models.names(tiny=True)
    image, points, labels = monet.models.example_inputs("sam2_hiera_t", batch=2)
    assert image.shape == (2, 3, 1024, 1024) and points.shape[:2] == labels.shape


def test_tiny_image_step_trains_every_image_parameter() -> None:
    model = tiny_model()
    image, points, labels = monet.models.example_inputs("sam2_tiny_test")
    masks, iou, object_scores = model(image, points, labels, multimask_output=True)
    assert masks.shape == (2, 3, 64, 64) and iou.shape == (2, 3)
    loss = segmentation_loss(masks, iou, object_scores)
    # A second prompt round: a box (labels 2, 3) plus a mask prompt, single-mask output.
    boxes = torch.tensor([[[4.0, 4.0], [40.0, 50.0]]]).expand(2, -1, -1)
    box_labels = torch.tensor([[2, 3]]).expand(2, -1)
    mask_prompt = torch.randn(2, 1, 16, 16)
    masks, iou, object_scores = model(image, boxes, box_labels, mask_inputs=mask_prompt)
    assert masks.shape == (2, 1, 64, 64)
    (loss + segmentation_loss(masks, iou, object_scores)).backward()

    missing = names_without_gradient(model)
    expected = {name for name in missing if name.startswith(VIDEO_ONLY + UNUSED)}
    assert missing == expected
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tiny_video_steps_train_the_memory() -> None:
    """Frame 0 takes a mask; frame 1 clicks, attends to frame 0's memory and pointer."""
    model = tiny_model()
    image, points, labels = monet.models.example_inputs("sam2_tiny_test")
    first_mask = (torch.rand(2, 1, 64, 64) > 0.5).float()
    _, _, _, memory, memory_pos, pointer = model.forward_video_frame(image, mask_inputs=first_mask)
    assert memory.shape == memory_pos.shape == (2, 16, 4, 4) and pointer.shape == (2, 32)

    masks, iou, object_scores, next_memory, _, next_pointer = model.forward_video_frame(
        image.flip(-1),
        points[:, :1],
        labels[:, :1],
        memory=memory.unsqueeze(1),
        memory_pos=memory_pos.unsqueeze(1),
        memory_offsets=torch.tensor([0]),
        object_pointers=pointer.unsqueeze(1),
        object_pointer_offsets=torch.tensor([1]),
    )
    assert masks.shape == (2, 3, 64, 64)  # one click: three candidate masks
    loss = segmentation_loss(masks, iou, object_scores) + next_memory.mean() + next_pointer.mean()
    loss.backward()

    video_parameters = {n for n, _ in model.named_parameters() if n.startswith(VIDEO_ONLY)}
    assert not video_parameters & names_without_gradient(model)


def test_video_memory_bank_of_several_frames() -> None:
    """Memories of T frames and P pointers: RoPE repeats over frames, skips pointers."""
    model = tiny_model().eval()
    image, points, labels = monet.models.example_inputs("sam2_tiny_test")
    memory = torch.randn(2, 3, 16, 4, 4)
    memory_pos = torch.randn(2, 3, 16, 4, 4)
    with torch.no_grad():
        outputs = model.forward_video_frame(
            image,
            points,
            labels,
            memory=memory,
            memory_pos=memory_pos,
            memory_offsets=torch.tensor([0, 2, 1]),
            object_pointers=torch.randn(2, 4, 32),
            object_pointer_offsets=torch.tensor([3, -1, 2, 1]),
        )
    assert outputs[0].shape == (2, 1, 64, 64)  # three clicks: one mask
    assert all(torch.isfinite(output).all() for output in outputs)


def test_rotary_matches_complex_reference() -> None:
    """The real-arithmetic RoPE equals the official complex multiply."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3 * 16, 8)  # three frames of a 4x4 grid
    angles = axial_rotary_angles(8, 4, 4)
    rotation = torch.polar(torch.ones_like(angles), angles).repeat(3, 1)
    reference = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation
    ).flatten(-2)
    torch.testing.assert_close(apply_rotary(x, angles.cos(), angles.sin()), reference)


def test_forward_stores_no_tensors_on_modules() -> None:
    model = tiny_model()
    before = {
        (name, key)
        for name, module in model.named_modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    }
    model(*monet.models.example_inputs("sam2_tiny_test"))
    after = {
        (name, key)
        for name, module in model.named_modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    }
    assert after == before


def test_tiny_image_step_captures_into_one_joint_graph() -> None:
    model = tiny_model()
    joint = capture(model, *monet.models.example_inputs("sam2_tiny_test"))
    targets = aten_targets(joint.module)
    attention = [t for t in targets if "scaled_dot_product" in t]
    assert any("backward" in t for t in attention) and any("backward" not in t for t in attention)
    assert "aten.convolution_backward.default" in targets
    assert "aten.bernoulli.p" in targets  # drop path is a visible random op
    # The joint graph returns the forward outputs, then one gradient slot per primal
    # (parameters, buffers, inputs): the same parameters as eager must get one.
    gradients = [value for value in gradient_slots(joint).values() if value is not None]
    model.zero_grad(set_to_none=True)
    sum(output.sum() for output in model(*monet.models.example_inputs("sam2_tiny_test"))).backward()
    eager = sum(1 for parameter in model.parameters() if parameter.grad is not None)
    assert len(gradients) == eager
