"""SAM 2's image predictor for serving: embeddings from a batch or the store, many prompts per
decoder call, and masks upsampled the cheaper of two exact ways.

The embedding of an image is SAM2ImagePredictor.set_image's: the decoder's image embedding (with
no_mem_embed added, as SAM 2 does for a still image) and the two high-resolution feature maps the
decoder adds while upscaling, stored in the encoder's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.transforms import SAM2Transforms

from sam_fast_serve.common.prompts import Prompts
from sam_fast_serve.models.amg import upsample_chunk
from sam_fast_serve.models.embedding import NO_IMAGE, EmbeddingCache, EmbeddingKeeper, EmbeddingStore, ImageEmbedding
from sam_fast_serve.models.fast_decoder import DecodedTokens, FastMaskDecoder, ImageState, no_mask_dense
from sam_fast_serve.models.prompted import LOGIT_CLAMP, segment_prompts, thresholded_masks
from sam_fast_serve.models.sam2.components import fill_holes_and_sprinkles
from sam_fast_serve.models.timing import StageClock
from sam_fast_serve.models.upsampling import bilinear


def embedding_layout(net: SAM2Base) -> dict[str, tuple[int, ...]]:
    """The tensors of one SAM 2 embedding (a 1024 model: (1, 256, 64, 64), (1, 32, 256, 256), (1, 64, 128, 128))."""
    size = net.image_size
    decoder = net.sam_mask_decoder
    return {
        "image_embed": (1, decoder.transformer_dim, size // 16, size // 16),
        "high_res_0": (1, decoder.conv_s0.out_channels, size // 4, size // 4),
        "high_res_1": (1, decoder.conv_s1.out_channels, size // 8, size // 8),
    }


class Sam2Predictor(EmbeddingKeeper):
    """The current image's embedding and masks for prompts on it.

    `dtype` is what the image encoder computes in (autocast) and what embeddings are kept in; the
    decoder is a FastMaskDecoder (by default in `dtype`), whose per-image work is done once in
    `set_embedding`; the prompt encoder computes in float32. `store`, `pinned` and `clock` as in
    EmbeddingKeeper. Mask logits are thresholded at 0, as SAM 2's predictor and generator do.
    """

    mask_threshold = 0.0

    def __init__(
        self,
        net: SAM2Base,
        dtype: torch.dtype,
        store: EmbeddingStore | None = None,
        decoder: FastMaskDecoder | None = None,
    ) -> None:
        self.model = net
        self.dtype = dtype
        self.decoder = decoder if decoder is not None else FastMaskDecoder(net.sam_mask_decoder, dtype)
        self.decoder_state: ImageState | None = None
        self.device = net.device
        self.store = store if store is not None else EmbeddingStore(EmbeddingCache(0))
        self.pinned: dict[str, ImageEmbedding] = {}
        self.clock = StageClock(self.device)
        # SAM 2's own resize and normalisation (torchvision's, scripted once here).
        self.transforms = SAM2Transforms(resolution=net.image_size, mask_threshold=self.mask_threshold)
        self.features: dict[str, torch.Tensor] | None = None
        self.original_size: tuple[int, int] | None = None

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
        net = self.model
        results: list[ImageEmbedding] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = self.transforms.forward_batch(chunk).to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                fpn = net.forward_image(batch)["backbone_fpn"]
            embed = fpn[2]
            if net.directly_add_no_mem_embed:
                embed = embed + net.no_mem_embed.reshape(1, -1, 1, 1)
            tensors = {"image_embed": embed, "high_res_0": fpn[0], "high_res_1": fpn[1]}
            for i, image in enumerate(chunk):
                kept = {name: t[i : i + 1].to(self.dtype).clone() for name, t in tensors.items()}
                results.append(ImageEmbedding(kept, (net.image_size, net.image_size), (image.shape[0], image.shape[1])))
        return results

    def set_image(self, image: np.ndarray) -> None:
        """Like SAM2ImagePredictor.set_image (RGB uint8 HWC), reusing a pinned or cached embedding."""
        self.set_pixels(image)

    @torch.no_grad()
    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make `embedding` the current image and run the decoder's once-per-image work."""
        features = {name: t.float() for name, t in embedding.tensors.items()}
        prompt_encoder = self.model.sam_prompt_encoder
        with self.clock.stage("mask_decoder"):
            self.decoder_state = self.decoder.prepare_image(
                features["image_embed"],
                prompt_encoder.get_dense_pe(),
                no_mask_dense(prompt_encoder),
                (features["high_res_0"], features["high_res_1"]),
            )
        self.features = features
        self.original_size = embedding.original_size

    def reset_predictor(self) -> None:
        self.features = None
        self.decoder_state = None
        self.original_size = None

    def model_coords(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 2) XY in original-image pixels -> the model's input frame (SAM2Transforms.transform_coords)."""
        assert self.original_size is not None
        h, w = self.original_size
        scale = torch.tensor([self.model.image_size / w, self.model.image_size / h], device=points.device)
        return points.float() * scale

    @torch.no_grad()
    def tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> DecodedTokens:
        """The decoder's transformer and IoU head for B prompts: `coords` (B, N, 2) in the
        model's frame with `labels` (B, N) (2 and 3 for a box's corners)."""
        if self.decoder_state is None:
            raise RuntimeError(NO_IMAGE)
        sparse, _ = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        with self.clock.stage("mask_decoder"):
            return self.decoder.run_transformer(self.decoder_state, sparse)

    def logits(self, tokens: DecodedTokens, prompt_idx: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
        """(K, 256, 256) float32 low-res logits of the selected (prompt, mask token) pairs."""
        with self.clock.stage("mask_decoder"):
            return self.decoder.mask_logits(tokens, prompt_idx, mask_idx)

    @torch.no_grad()
    def decode(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        multimask: bool,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, C, 256, 256) and predicted IoUs (B, C) of B prompts (see `tokens`),
        optionally a mask prompt each ((B, 1, 256, 256) logits): what SAM2ImagePredictor._predict's
        decoder call gives, C = 3 with `multimask`, else 1 (chosen by stability, as SAM 2's decoder
        does). A mask prompt changes the dense embedding per prompt, which the fast decoder shares
        per image, so that case runs SAM 2's decoder."""
        if mask_input is not None:
            return self._reference_decode(coords, labels, multimask, mask_input)
        tokens = self.tokens(coords, labels)
        count = len(coords)
        mask_ids = torch.arange(1, 4) if multimask else torch.arange(0, 4)
        prompt_idx = torch.arange(count).repeat_interleave(len(mask_ids))
        low_res = self.logits(tokens, prompt_idx, mask_ids.repeat(count)).view(
            count, len(mask_ids), *self._low_res_size
        )
        iou = tokens.iou_pred[:, mask_ids.to(tokens.iou_pred.device)]
        if multimask:
            return low_res, iou
        decoder = self.model.sam_mask_decoder
        if decoder.dynamic_multimask_via_stability:
            return decoder._dynamic_multimask_via_stability(low_res, iou)
        return low_res[:, :1], iou[:, :1]

    @property
    def _low_res_size(self) -> tuple[int, int]:
        size = self.model.image_size // 4
        return size, size

    def _reference_decode(
        self,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask: bool,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's own decoder call, for prompts the fast decoder does not fold (a mask prompt)."""
        if self.features is None:
            raise RuntimeError(NO_IMAGE)
        net = self.model
        features = self.features
        points = None if coords is None or labels is None else (coords, labels)
        with self.clock.stage("mask_decoder"):
            sparse, dense = net.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
            low_res, iou, _, _ = net.sam_mask_decoder(
                image_embeddings=features["image_embed"],
                image_pe=net.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=sparse.shape[0] > 1,
                high_res_features=[features["high_res_0"], features["high_res_1"]],
            )
        return low_res, iou

    def upsample(self, low_res: torch.Tensor, fill_area: int = 0) -> torch.Tensor:
        """(B, C, h, w) low-res logits -> (B, C, H, W) float32 logits at the original size, as
        SAM2Transforms.postprocess_masks makes them: holes and sprinkles of at most `fill_area`
        pixels filled first (0: none), then bilinear resizing (by two products where they pay)."""
        assert self.original_size is not None
        masks = low_res.float()
        if fill_area > 0:
            masks = fill_holes_and_sprinkles(masks, self.mask_threshold, fill_area, fill_area)
        return bilinear(masks, self.original_size)

    def segment_prompts(self, prompts: Prompts) -> list[dict[str, Any]]:
        """The answer to `prompts` on the current image (models.prompted.segment_prompts)."""
        return segment_prompts(self, prompts)

    @torch.no_grad()
    def predict_prompts(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM2ImagePredictor.predict for validated prompts (see PromptPredictor): each box is one
        prompt, its corners first, and the points join every box."""
        count = prompts.count
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prompts.boxes is not None:
            corners = torch.as_tensor(prompts.boxes, device=self.device).reshape(-1, 2, 2)
            parts.append((corners, torch.tensor([[2, 3]], dtype=torch.int, device=self.device).expand(count, -1)))
        if prompts.points is not None:
            points = torch.as_tensor(prompts.points, device=self.device)[None].expand(count, -1, -1)
            parts.append(
                (points, torch.as_tensor(prompts.labels, dtype=torch.int, device=self.device)[None].expand(count, -1))
            )
        mask = (
            None if prompts.mask_input is None else torch.as_tensor(prompts.mask_input, device=self.device)[None, None]
        )
        if parts:
            coords = self.model_coords(torch.cat([p for p, _ in parts], dim=1))
            labels = torch.cat([label for _, label in parts], dim=1)
            low_res, iou = self.decode(coords, labels, prompts.multimask, mask)
        else:
            low_res, iou = self._reference_decode(None, None, prompts.multimask, mask)
        assert self.original_size is not None
        per_chunk = upsample_chunk(self.device, self.original_size[0] * self.original_size[1])
        masks = thresholded_masks(self.upsample, low_res, self.mask_threshold, self.original_size, per_chunk)
        return masks, iou, low_res.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
