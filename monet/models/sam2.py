"""SAM 2 (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024).

A full SAM 2.1 model per released configuration (Hiera-T/S/B+/L): the Hiera
image encoder with its FPN neck, the prompt encoder, the mask decoder, and for
video the memory encoder and memory attention. ``forward`` is the promptable
image segmentation training step, ``forward_video_frame`` one streaming video
step whose memory bank is passed in and out as tensors.

Written to trace cleanly into one aten graph: no data-dependent Python control
flow, position encodings computed from shapes (or kept as buffers), nothing
stored on modules during forward. Module and parameter names follow the
official ``SAM2Base`` so that state-dict keys line up with the released code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monet.models.registry import register
from monet.models.sam2_decoder import MaskDecoder, PromptEncoder, TwoWayTransformer
from monet.models.sam2_hiera import FpnNeck, Hiera, ImageEncoder
from monet.models.sam2_layers import MLP, sine_encoding_1d, sine_position_encoding
from monet.models.sam2_memory import MemoryAttention, MemoryEncoder

NO_OBJECT_SCORE = -1024.0
"""Mask logit SAM 2 writes where the object-score head says the object is absent."""


class SAM2(nn.Module):
    """SAM 2.1 with the released configurations' options fixed.

    Options on in every released 2.1 config and therefore built in here: high-
    resolution features in the decoder, ``directly_add_no_mem_embed``, object
    scores with an MLP head, object pointers through an MLP with a projected
    signed temporal encoding, ``no_obj_embed_spatial``, sigmoid IoU head,
    multimask tokens for pointers, and mask inputs used as outputs.
    """

    def __init__(
        self,
        trunk: Hiera,
        image_size: int = 1024,
        hidden_dim: int = 256,
        mem_dim: int = 64,
        num_maskmem: int = 7,
        max_obj_ptrs_in_encoder: int = 16,
        memory_attention_layers: int = 4,
        memory_feedforward_dim: int = 2048,
        memory_dropout: float = 0.1,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        sigmoid_scale_for_mem_enc: float = 20.0,
        sigmoid_bias_for_mem_enc: float = -10.0,
        multimask_max_pt_num: int = 1,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.backbone_stride = 16
        self.embedding_size = image_size // self.backbone_stride
        self.hidden_dim = hidden_dim
        self.mem_dim = mem_dim
        self.num_maskmem = num_maskmem
        self.max_obj_ptrs_in_encoder = max_obj_ptrs_in_encoder
        self.sigmoid_scale_for_mem_enc = sigmoid_scale_for_mem_enc
        self.sigmoid_bias_for_mem_enc = sigmoid_bias_for_mem_enc
        self.multimask_max_pt_num = multimask_max_pt_num

        neck = FpnNeck(hidden_dim, trunk.channel_list, fpn_top_down_levels=(2, 3))
        self.image_encoder = ImageEncoder(trunk, neck, scalp=1)
        # Turns a mask input into a mask prompt at the decoder's low resolution.
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        feature_size = (self.embedding_size, self.embedding_size)
        self.memory_attention = MemoryAttention(
            hidden_dim,
            memory_attention_layers,
            memory_feedforward_dim,
            memory_dropout,
            kv_in_dim=mem_dim,
            feat_sizes=feature_size,
        )
        self.memory_encoder = MemoryEncoder(mem_dim, hidden_dim)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(num_maskmem, 1, 1, mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        # Unused with directly_add_no_mem_embed (as in the released model); kept for its keys.
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, hidden_dim))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, mem_dim))
        for parameter in (
            self.maskmem_tpos_enc,
            self.no_mem_embed,
            self.no_mem_pos_enc,
            self.no_obj_ptr,
            self.no_obj_embed_spatial,
        ):
            nn.init.trunc_normal_(parameter, std=0.02)

        self.sam_prompt_encoder = PromptEncoder(
            hidden_dim, feature_size, (image_size, image_size), mask_in_chans=16
        )
        self.sam_mask_decoder = MaskDecoder(
            hidden_dim,
            TwoWayTransformer(2, hidden_dim, decoder_heads, decoder_mlp_dim),
            iou_head_hidden_dim=hidden_dim,
        )
        self.obj_ptr_proj = MLP(hidden_dim, hidden_dim, hidden_dim, 3)
        self.obj_ptr_tpos_proj = nn.Linear(hidden_dim, mem_dim)

    def image_features(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Stride-16 features ``(B, C, H, W)`` and the projected stride-4/8 maps for the decoder."""
        stride_4, stride_8, stride_16 = self.image_encoder(image)
        high_res = (
            self.sam_mask_decoder.conv_s0(stride_4),
            self.sam_mask_decoder.conv_s1(stride_8),
        )
        return stride_16, high_res

    def use_multimask(self, point_labels: torch.Tensor | None) -> bool:
        """SAM 2's rule: three candidate masks for ambiguous prompts (at most one click)."""
        num_points = 0 if point_labels is None else point_labels.shape[1]
        return num_points <= self.multimask_max_pt_num

    def predict_masks(
        self,
        features: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        mask_prompt: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder: full-resolution mask logits ``(B, M, image, image)``,
        IoU ``(B, M)``, SAM output tokens and object-score logits ``(B, 1)``."""
        batch = features.shape[0]
        if point_coords is None:
            # No clicks: one padding point, as the official heads do.
            point_coords = features.new_zeros(batch, 1, 2)
            point_labels = -torch.ones(batch, 1, dtype=torch.long, device=features.device)
        if (
            mask_prompt is not None
            and mask_prompt.shape[-2:] != self.sam_prompt_encoder.mask_input_size
        ):
            mask_prompt = F.interpolate(
                mask_prompt.float(),
                size=self.sam_prompt_encoder.mask_input_size,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        sparse, dense = self.sam_prompt_encoder(point_coords, point_labels, masks=mask_prompt)
        masks, iou, tokens, object_score_logits = self.sam_mask_decoder(
            features,
            self.sam_prompt_encoder.dense_position_encoding(),
            sparse,
            dense,
            multimask_output=multimask_output,
            high_res_features=high_res,
        )
        # The mask is a hard choice between object and no object, like the score.
        present = (object_score_logits > 0)[:, :, None, None]
        masks = torch.where(present, masks, torch.full_like(masks, NO_OBJECT_SCORE))
        masks = F.interpolate(
            masks.float(),
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
        )
        return masks, iou, tokens, object_score_logits

    def forward(
        self,
        image: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Promptable image segmentation (an image is a one-frame video with no memory).

        ``image`` ``(B, 3, S, S)``; ``point_coords`` ``(B, N, 2)`` pixel ``(x, y)``;
        ``point_labels`` ``(B, N)`` (1 positive, 0 negative, 2/3 box corners, -1
        padding); ``mask_inputs`` an optional ``(B, 1, h, w)`` mask prompt (logits).
        Returns mask logits ``(B, M, S, S)``, predicted IoU ``(B, M)`` and
        object-score logits ``(B, 1)``; ``M`` is 3 or 1, by SAM 2's rule unless
        ``multimask_output`` says.
        """
        features, high_res = self.image_features(image)
        # directly_add_no_mem_embed: a frame without memory skips memory attention.
        features = features + self.no_mem_embed.view(1, -1, 1, 1)
        if multimask_output is None:
            multimask_output = self.use_multimask(point_labels)
        masks, iou, _, object_score_logits = self.predict_masks(
            features, high_res, point_coords, point_labels, mask_inputs, multimask_output
        )
        return masks, iou, object_score_logits

    def condition_on_memory(
        self,
        features: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_offsets: torch.Tensor,
        object_pointers: torch.Tensor | None,
        object_pointer_offsets: torch.Tensor | None,
    ) -> torch.Tensor:
        """Memory attention from the current features to the memory bank and object pointers."""
        batch, channels, height, width = features.shape
        frames = memory.shape[1]
        current = features.flatten(2).transpose(1, 2)
        current_pos = sine_position_encoding(
            height, width, channels, features.device, features.dtype
        )
        current_pos = current_pos.flatten(1).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1)

        # Temporal encoding: conditioning frames (offset 0) take the last slot,
        # the frame t before the current one takes slot t - 1.
        slots = torch.where(memory_offsets == 0, self.num_maskmem - 1, memory_offsets - 1)
        temporal = self.maskmem_tpos_enc.view(self.num_maskmem, self.mem_dim)[slots]
        memory_tokens = memory.permute(0, 1, 3, 4, 2).reshape(batch, frames * height * width, -1)
        memory_pos = memory_pos.permute(0, 1, 3, 4, 2).reshape(batch, frames, height * width, -1)
        memory_pos = (memory_pos + temporal[None, :, None, :]).flatten(1, 2)

        num_pointer_tokens = 0
        if object_pointers is not None:
            if object_pointer_offsets is None:
                raise ValueError("object_pointers need object_pointer_offsets")
            pointers = object_pointers.shape[1]
            split = self.hidden_dim // self.mem_dim
            # Signed distance in frames, normalised by the largest the encoder attends to.
            time = object_pointer_offsets.float() / (self.max_obj_ptrs_in_encoder - 1)
            pointer_pos = self.obj_ptr_tpos_proj(sine_encoding_1d(time, self.hidden_dim))
            pointer_pos = (
                pointer_pos.repeat_interleave(split, dim=0).unsqueeze(0).expand(batch, -1, -1)
            )
            # A pointer wider than a memory token becomes several tokens.
            pointer_tokens = object_pointers.reshape(batch, pointers * split, self.mem_dim)
            memory_tokens = torch.cat((memory_tokens, pointer_tokens), dim=1)
            memory_pos = torch.cat((memory_pos, pointer_pos), dim=1)
            num_pointer_tokens = pointers * split

        conditioned = self.memory_attention(
            current, memory_tokens, current_pos, memory_pos, num_obj_ptr_tokens=num_pointer_tokens
        )
        return conditioned.transpose(1, 2).reshape(batch, channels, height, width)

    def object_pointer(
        self, tokens: torch.Tensor, object_score_logits: torch.Tensor, best: torch.Tensor | None
    ) -> torch.Tensor:
        """Object pointer ``(B, C)`` from the chosen SAM output token, the learned
        no-object pointer where the object is absent."""
        if best is not None and tokens.shape[1] > 1:
            token = tokens.take_along_dim(best[:, None, None], dim=1)[:, 0]
        else:
            token = tokens[:, 0]
        present = (object_score_logits > 0).float()
        return present * self.obj_ptr_proj(token) + (1 - present) * self.no_obj_ptr

    def encode_memory(
        self, features: torch.Tensor, mask_logits: torch.Tensor, object_score_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory features and position code ``(B, mem_dim, H, W)`` of this frame's prediction."""
        mask = (
            torch.sigmoid(mask_logits) * self.sigmoid_scale_for_mem_enc
            + self.sigmoid_bias_for_mem_enc
        )
        memory, memory_pos = self.memory_encoder(features, mask)
        absent = 1 - (object_score_logits > 0).float()
        return memory + absent[:, :, None, None] * self.no_obj_embed_spatial[
            :, :, None, None
        ], memory_pos

    def forward_video_frame(
        self,
        image: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
        memory_offsets: torch.Tensor | None = None,
        object_pointers: torch.Tensor | None = None,
        object_pointer_offsets: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """One streaming video step; the memory bank comes in and the new entry goes out.

        ``memory``/``memory_pos``: ``(B, T, mem_dim, H, W)`` memories of earlier
        frames (None on a conditioning frame without memory); ``memory_offsets``
        ``(T,)`` integers, 0 for a conditioning frame else how many frames back
        (1 .. num_maskmem - 1); ``object_pointers`` ``(B, P, C)`` with signed frame
        distances ``object_pointer_offsets`` ``(P,)``. With ``mask_inputs``
        ``(B, 1, S, S)`` the mask is the output (SAM 2's
        ``use_mask_input_as_output_without_sam``).

        Returns mask logits ``(B, M, S, S)``, IoU ``(B, M)``, object-score logits
        ``(B, 1)``, and this frame's memory ``(B, mem_dim, H, W)``, its position
        code and its object pointer ``(B, C)`` for the caller to append to the bank.
        """
        features, high_res = self.image_features(image)
        batch = features.shape[0]
        if mask_inputs is not None:
            mask = mask_inputs.float()
            masks = mask * 20.0 - 10.0  # logits of about +-10: the mask, taken as certain
            iou = mask.new_ones(batch, 1)
            present = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()
            object_score_logits = 20.0 * present - 10.0
            # The pointer still comes from the decoder, prompted with the mask.
            _, _, tokens, _ = self.predict_masks(
                features, high_res, None, None, self.mask_downsample(mask), multimask_output=False
            )
            pointer = self.object_pointer(tokens, object_score_logits, None)
            best_mask = masks
        else:
            if memory is None:
                conditioned = features + self.no_mem_embed.view(1, -1, 1, 1)
            else:
                if memory_pos is None or memory_offsets is None:
                    raise ValueError("memory needs memory_pos and memory_offsets")
                conditioned = self.condition_on_memory(
                    features,
                    memory,
                    memory_pos,
                    memory_offsets,
                    object_pointers,
                    object_pointer_offsets,
                )
            if multimask_output is None:
                multimask_output = self.use_multimask(point_labels)
            masks, iou, tokens, object_score_logits = self.predict_masks(
                conditioned, high_res, point_coords, point_labels, None, multimask_output
            )
            best = iou.argmax(dim=1)
            best_mask = masks.take_along_dim(best[:, None, None, None], dim=1)
            pointer = self.object_pointer(tokens, object_score_logits, best)
        new_memory, new_memory_pos = self.encode_memory(features, best_mask, object_score_logits)
        return masks, iou, object_score_logits, new_memory, new_memory_pos, pointer


PAPER_TRUNKS: dict[str, dict[str, Any]] = {
    "t": {
        "embed_dim": 96,
        "num_heads": 1,
        "stages": (1, 2, 7, 2),
        "global_att_blocks": (5, 7, 9),
        "window_pos_embed_bkg_spatial_size": (7, 7),
    },
    "s": {
        "embed_dim": 96,
        "num_heads": 1,
        "stages": (1, 2, 11, 2),
        "global_att_blocks": (7, 10, 13),
        "window_pos_embed_bkg_spatial_size": (7, 7),
    },
    "b_plus": {"embed_dim": 112, "num_heads": 2},
    "l": {
        "embed_dim": 144,
        "num_heads": 2,
        "stages": (2, 6, 36, 4),
        "global_att_blocks": (23, 33, 43),
        "window_pos_embed_bkg_spatial_size": (7, 7),
        "window_spec": (8, 4, 16, 8),
    },
}
"""Hiera trunks of ``sam2.1_hiera_{t,s,b+,l}.yaml`` (unset keys take Hiera's defaults)."""


def build_sam2(trunk: dict[str, Any], drop_path_rate: float, **overrides: Any) -> SAM2:
    """A :class:`SAM2` with a Hiera trunk from ``trunk``; ``overrides`` go to :class:`SAM2`."""
    return SAM2(Hiera(drop_path_rate=drop_path_rate, **trunk), **overrides)


def _prompted_images(size: int, num_points: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def make(batch: int) -> tuple[torch.Tensor, ...]:
        image = torch.randn(batch, 3, size, size)
        point_coords = torch.rand(batch, num_points, 2) * size
        point_labels = torch.randint(0, 2, (batch, num_points))
        point_labels[:, 0] = 1  # the first click is on the object
        return image, point_coords, point_labels

    return make


# Drop path 0.1 for every size: the rate of the one released SAM 2.1 training
# config (Hiera-B+, MOSE fine-tuning). The model configs leave it at 0, which is
# for inference, and no training config of the other sizes is published.


@register(
    "sam2_hiera_t",
    example_inputs=_prompted_images(1024, 3),
    default_batch=1,
    tags=("sam2", "paper"),
)
def sam2_hiera_t(drop_path_rate: float = 0.1, **overrides: Any) -> SAM2:
    """SAM 2.1 Hiera-T: 38.9M parameters, 1024x1024 images."""
    return build_sam2(PAPER_TRUNKS["t"], drop_path_rate, **overrides)


@register(
    "sam2_hiera_s",
    example_inputs=_prompted_images(1024, 3),
    default_batch=1,
    tags=("sam2", "paper"),
)
def sam2_hiera_s(drop_path_rate: float = 0.1, **overrides: Any) -> SAM2:
    """SAM 2.1 Hiera-S: 46M parameters, 1024x1024 images."""
    return build_sam2(PAPER_TRUNKS["s"], drop_path_rate, **overrides)


@register(
    "sam2_hiera_b_plus",
    example_inputs=_prompted_images(1024, 3),
    default_batch=1,
    tags=("sam2", "paper"),
)
def sam2_hiera_b_plus(drop_path_rate: float = 0.1, **overrides: Any) -> SAM2:
    """SAM 2.1 Hiera-B+: 80.8M parameters, 1024x1024 images."""
    return build_sam2(PAPER_TRUNKS["b_plus"], drop_path_rate, **overrides)


@register(
    "sam2_hiera_l",
    example_inputs=_prompted_images(1024, 3),
    default_batch=1,
    tags=("sam2", "paper"),
)
def sam2_hiera_l(drop_path_rate: float = 0.1, **overrides: Any) -> SAM2:
    """SAM 2.1 Hiera-L: 224.4M parameters, 1024x1024 images."""
    return build_sam2(PAPER_TRUNKS["l"], drop_path_rate, **overrides)


TINY_TRUNK: dict[str, Any] = {
    "embed_dim": 8,
    "num_heads": 1,
    "stages": (1, 2, 2, 1),
    "global_att_blocks": (4,),
    "window_pos_embed_bkg_spatial_size": (4, 4),
    # Stage 4's first block attends in 3x3 windows over a 4x4 grid: exercises padding.
    "window_spec": (4, 2, 3, 2),
}
"""A 6-block Hiera with every feature of the real ones (pooling, windows, padding, global)."""


@register(
    "sam2_tiny_test",
    example_inputs=_prompted_images(64, 3),
    default_batch=2,
    tiny=True,
    tags=("sam2", "test"),
)
def sam2_tiny_test(drop_path_rate: float = 0.1, **overrides: Any) -> SAM2:
    """A tiny SAM 2 for unit tests: 64x64 images, width 32, one memory-attention layer."""
    config: dict[str, Any] = {
        "image_size": 64,
        "hidden_dim": 32,
        "mem_dim": 16,
        "memory_attention_layers": 1,
        "memory_feedforward_dim": 64,
        "decoder_heads": 2,
        "decoder_mlp_dim": 64,
    }
    config.update(overrides)
    return build_sam2(TINY_TRUNK, drop_path_rate, **config)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


__all__: Sequence[str] = (
    "SAM2",
    "build_sam2",
    "parameter_count",
    "sam2_hiera_b_plus",
    "sam2_hiera_l",
    "sam2_hiera_s",
    "sam2_hiera_t",
    "sam2_tiny_test",
)
