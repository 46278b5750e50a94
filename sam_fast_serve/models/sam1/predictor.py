"""A SamPredictor whose image embeddings can come from a batch or a store, decoding with FastMaskDecoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from sam_fast_serve.common.prompts import Prompts
from sam_fast_serve.models.amg import upsample_chunk
from sam_fast_serve.models.embedding import NO_IMAGE, EmbeddingCache, EmbeddingKeeper, EmbeddingStore, ImageEmbedding
from sam_fast_serve.models.fast_decoder import FastMaskDecoder, ImageState, no_mask_dense
from sam_fast_serve.models.prompted import segment_prompts, thresholded_masks
from sam_fast_serve.models.sam1.embeddings import encode_images
from sam_fast_serve.models.sam1.upsampling import postprocess_masks
from sam_fast_serve.models.timing import StageClock


class FastSamPredictor(EmbeddingKeeper, SamPredictor):
    """SamPredictor plus: embeddings looked up by pixel key before the encoder runs, and the
    per-image part of the mask decoder done once in `set_embedding`.

    `store` keeps embeddings across requests (and workers, when it is shared); `pinned` (filled by
    `pin`, EmbeddingKeeper) holds the embeddings of the images of the batch being served, whatever
    the store keeps. `clock` gathers the seconds spent in the embedding store, the image encoder and the mask decoder.
    """

    def __init__(self, sam: Sam, decoder: FastMaskDecoder, store: EmbeddingStore | None = None) -> None:
        super().__init__(sam)
        self.decoder = decoder
        self.store = store if store is not None else EmbeddingStore(EmbeddingCache(0))
        self.pinned: dict[str, ImageEmbedding] = {}
        self.decoder_state: ImageState | None = None
        self.clock = StageClock(self.device)

    def encode_images(self, images: list[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
        return encode_images(self.model, images, batch_size)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Like SamPredictor.set_image (RGB uint8 HWC), reusing a pinned or cached embedding."""
        self.set_pixels(image[..., ::-1] if image_format != "RGB" else image)

    @torch.no_grad()
    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make `embedding` the current image and run the decoder's once-per-image work."""
        self.reset_image()
        self.features = embedding["features"]
        self.input_size = embedding.input_size
        self.original_size = embedding.original_size
        prompt_encoder = self.model.prompt_encoder
        with self.clock.stage("mask_decoder"):
            self.decoder_state = self.decoder.prepare_image(
                self.features, prompt_encoder.get_dense_pe(), no_mask_dense(prompt_encoder)
            )
        self.is_image_set = True

    def segment_prompts(self, prompts: Prompts) -> list[dict[str, Any]]:
        """The answer to `prompts` on the current image (models.prompted.segment_prompts)."""
        return segment_prompts(self, prompts)

    def predict_prompts(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`predict_torch` for validated prompts in original-image pixels (see PromptPredictor)."""
        assert self.original_size is not None
        size = self.original_size
        coords = labels = boxes = None
        if prompts.points is not None:
            transformed = self.transform.apply_coords(prompts.points, size)
            coords = torch.as_tensor(transformed, dtype=torch.float, device=self.device)[None].expand(
                prompts.count, -1, -1
            )
            labels = torch.as_tensor(prompts.labels, device=self.device)[None].expand(prompts.count, -1)
        if prompts.boxes is not None:
            boxes = torch.as_tensor(
                self.transform.apply_boxes(prompts.boxes, size), dtype=torch.float, device=self.device
            )
        mask = (
            None if prompts.mask_input is None else torch.as_tensor(prompts.mask_input, device=self.device)[None, None]
        )
        return self.predict_torch(coords, labels, boxes, mask, multimask_output=prompts.multimask)

    def image_state(self) -> ImageState:
        """The decoder's per-image state of the current image (RuntimeError when none is set)."""
        if self.decoder_state is None:
            raise RuntimeError(NO_IMAGE)
        return self.decoder_state

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SamPredictor.predict_torch (same arguments and outputs) through the fast decoder.

        Returns masks (B, C, H, W), their predicted IoUs (B, C) and low-res logits (B, C, 256, 256),
        C = 3 with multimask_output, else 1. A mask_input changes the dense embedding per prompt,
        which the fast decoder shares per image, so that case uses segment_anything's decoder.
        """
        if mask_input is not None:
            return super().predict_torch(point_coords, point_labels, boxes, mask_input, multimask_output, return_logits)
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, _ = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
        mask_ids = torch.arange(1, 4) if multimask_output else torch.arange(0, 1)
        count = len(mask_ids)
        prompt_idx = torch.arange(sparse.shape[0]).repeat_interleave(count)
        with self.clock.stage("mask_decoder"):
            tokens = self.decoder.run_transformer(self.image_state(), sparse)
            low_res = self.decoder.mask_logits(
                tokens, prompt_idx.to(sparse.device), mask_ids.repeat(sparse.shape[0]).to(sparse.device)
            )
        low_res = low_res.view(sparse.shape[0], count, *low_res.shape[-2:])
        if return_logits:
            masks = self.upsample(low_res)
        else:
            assert self.original_size is not None
            masks = thresholded_masks(
                self.upsample,
                low_res,
                self.model.mask_threshold,
                self.original_size,
                self.masks_per_upsample(self.original_size),
            )
        return masks, tokens.iou_pred[:, mask_ids.to(sparse.device)], low_res

    def masks_per_upsample(self, size: tuple[int, ...]) -> int:
        """How many masks `upsample` takes at once to a (H, W) `size` (amg.upsample_chunk): its
        largest float intermediate is the padded input's square or the image."""
        padded = self.model.image_encoder.img_size
        return upsample_chunk(self.device, max(padded * padded, int(size[0]) * int(size[1])))

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, C, 256, 256) low-res logits of the set image -> (B, C, H, W) float32 logits at its
        original size: `Sam.postprocess_masks`, as two matrix products where they pay."""
        return postprocess_masks(self.model, low_res, self.input_size, self.original_size)

    def reset_image(self) -> None:
        super().reset_image()
        self.decoder_state = None
