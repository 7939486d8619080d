"""SAM 2's prompt encoder and mask decoder (two-way transformer, hypernetwork heads).

As in SAM, with SAM 2's additions: high-resolution stride-4/8 features added
while upscaling the mask embedding, a sigmoid on the IoU head, and an
object-score token whose MLP head predicts whether the object is present.
Module and parameter names follow the official ``sam2.modeling.sam``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monet.models.layers import LayerNorm2d
from monet.models.sam2_layers import MLP


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised 2-D coordinates (SAM's prompt encoding)."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats)
        )

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode coordinates in ``[0, 1]^2`` (last dim 2) to ``2 * num_pos_feats`` channels."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat((coords.sin(), coords.cos()), dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Encoding of every cell centre of a ``height x width`` grid, shape ``(C, H, W)``."""
        device = self.positional_encoding_gaussian_matrix.device
        rows = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        columns = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        coords = torch.stack(
            (columns[None, :].expand(height, width), rows[:, None].expand(height, width)), dim=-1
        )
        return self.encode(coords).permute(2, 0, 1)

    def encode_pixels(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode ``(x, y)`` pixel coordinates of an ``image_size = (H, W)`` image."""
        normalised = torch.stack(
            (coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]), dim=-1
        )
        return self.encode(normalised.float())


class PromptEncoder(nn.Module):
    """Embeds points, boxes and masks into sparse tokens and a dense map.

    Point labels: 1 positive click, 0 negative click, 2 and 3 the top-left and
    bottom-right box corners (SAM 2 feeds boxes as two labelled points), -1
    padding.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_position_encoding(self) -> torch.Tensor:
        """Position encoding of the image embedding grid, shape ``(1, C, H, W)``."""
        return self.pe_layer.grid(*self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Point tokens ``(B, N (+1 pad), C)``: position code plus the label's embedding."""
        coords = coords + 0.5  # pixel centres
        if pad:
            coords = F.pad(coords, (0, 0, 0, 1))
            labels = F.pad(labels, (0, 1), value=-1)
        encoding = self.pe_layer.encode_pixels(coords, self.input_image_size)
        # Padding points carry no position, only their own embedding. A lookup in
        # one table replaces the official masked in-place adds, which trace badly.
        encoding = torch.where((labels == -1).unsqueeze(-1), torch.zeros_like(encoding), encoding)
        table = torch.cat(
            [self.not_a_point_embed.weight]
            + [embedding.weight for embedding in self.point_embeddings]
        )
        return encoding + F.embedding(labels.long() + 1, table)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box tokens ``(B, 2, C)`` from ``(B, 4)`` boxes ``(x0, y0, x1, y1)``."""
        corners = boxes.reshape(-1, 2, 2) + 0.5
        encoding = self.pe_layer.encode_pixels(corners, self.input_image_size)
        corner_embeddings = torch.cat(
            (self.point_embeddings[2].weight, self.point_embeddings[3].weight)
        )
        return encoding + corner_embeddings

    def forward(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse tokens ``(B, N, C)`` and the dense embedding ``(B, C, H, W)``."""
        if point_coords is not None:
            batch = point_coords.shape[0]
            device = point_coords.device
        elif boxes is not None:
            batch, device = boxes.shape[0], boxes.device
        elif masks is not None:
            batch, device = masks.shape[0], masks.device
        else:
            batch, device = 1, self.no_mask_embed.weight.device
        sparse = []
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords need point_labels")
            sparse.append(self.embed_points(point_coords, point_labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch, -1, *self.image_embedding_size
            )
        if not sparse:
            sparse.append(torch.zeros(batch, 0, self.embed_dim, device=device))
        return torch.cat(sparse, dim=1), dense


class Attention(nn.Module):
    """Multi-head attention with an optional smaller internal width (``downsample_rate``)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide the internal dimension")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout_p = dropout

    def separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def recombine_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        return self.out_proj(self.recombine_heads(out))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        query = self.separate_heads(self.q_proj(q))
        key = self.separate_heads(self.k_proj(k))
        value = self.separate_heads(self.v_proj(v))
        return self.attend(query, key, value)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image, MLP, then image-to-token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            # The first layer's queries are the prompt tokens themselves, already positional.
            queries = self.self_attn(queries, queries, queries)
        else:
            with_position = queries + query_pe
            queries = queries + self.self_attn(with_position, with_position, queries)
        queries = self.norm1(queries)

        keys_with_position = keys + key_pe
        attended = self.cross_attn_token_to_image(queries + query_pe, keys_with_position, keys)
        queries = self.norm2(queries + attended)

        queries = self.norm3(queries + self.mlp(queries))

        attended = self.cross_attn_image_to_token(keys_with_position, queries + query_pe, queries)
        keys = self.norm4(keys + attended)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer: prompt tokens and image tokens attend to each other."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=index == 0,
            )
            for index in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the processed tokens ``(B, N, C)`` and image tokens ``(B, HW, C)``."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attended = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attended)
        return queries, keys


class MaskDecoder(nn.Module):
    """Predicts mask logits, their IoU and an object score from image and prompt embeddings."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask logits ``(B, M, 4H, 4W)``, IoU ``(B, M)``, SAM output tokens ``(B, M', C)``
        and object-score logits ``(B, 1)``; ``M`` is 3 with ``multimask_output`` else 1.

        ``high_res_features`` are the stride-4 and stride-8 maps already passed
        through ``conv_s0`` and ``conv_s1``.
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features,
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # The single-mask token is the one the memory is trained to point with.
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoUs, the mask tokens and the object score."""
        output_tokens = [self.iou_token.weight, self.mask_tokens.weight]
        first = 0
        if self.pred_obj_scores:
            output_tokens.insert(0, self.obj_score_token.weight)
            first = 1
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat(output_tokens).unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if image_embeddings.shape[0] != batch:
            raise ValueError("image and prompt batches differ; repeat the image per prompt first")
        source = image_embeddings + dense_prompt_embeddings
        position = image_pe.expand(batch, -1, -1, -1)
        _, channels, height, width = source.shape

        tokens_out, source = self.transformer(source, position, tokens)
        iou_token_out = tokens_out[:, first]
        mask_tokens_out = tokens_out[:, first + 1 : first + 1 + self.num_mask_tokens]

        source = source.transpose(1, 2).reshape(batch, channels, height, width)
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder was built for high-resolution features")
            upscale_1, norm_1, activation_1, upscale_2, activation_2 = self.output_upscaling
            feature_s0, feature_s1 = high_res_features
            upscaled = activation_1(norm_1(upscale_1(source) + feature_s1))
            upscaled = activation_2(upscale_2(upscaled) + feature_s0)
        else:
            upscaled = self.output_upscaling(source)

        hyper_in = torch.stack(
            [
                mlp(mask_tokens_out[:, index])
                for index, mlp in enumerate(self.output_hypernetworks_mlps)
            ],
            dim=1,
        )
        _, channels, height, width = upscaled.shape
        masks = (hyper_in @ upscaled.flatten(2)).reshape(batch, -1, height, width)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(tokens_out[:, 0])
        else:
            # "Object present" with certainty when the decoder has no object-score head.
            object_score_logits = 10.0 * iou_pred.new_ones(batch, 1)
        return masks, iou_pred, mask_tokens_out, object_score_logits
