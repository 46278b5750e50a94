"""SamAutomaticMaskGenerator with the fast decoder, batched image encoding, early IoU filtering
and RLE done by pycocotools' C encoder.

It subclasses segment_anything's generator and keeps its crop handling and NMS. What changes:
the image embedding (pinned in batches of `process_batch_size`), the per-batch decoding
(`_process_batch`), and the RLE format kept between stages: COCO's compressed RLE (counts as
bytes) instead of Python lists of run lengths, which the reference deep-copies on every
concatenation and encodes in a Python loop (for fragmented masks that took longer than the model).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import MaskData

from sam_fast_serve.models.amg import BatchedGeneration, clean_small_regions, kept_pairs, records
from sam_fast_serve.models.fast_decoder import FastMaskDecoder
from sam_fast_serve.models.sam1.predictor import FastSamPredictor


class SamAutomaticMaskGenerator(BatchedGeneration, ReferenceGenerator):
    """Drop-in for segment_anything.SamAutomaticMaskGenerator (same arguments and records), plus:

    process_batch_size: images (or crops) per image-encoder call in `generate_batch`.
    predictor: a FastSamPredictor for `model`, to share its decoder and embedding cache between
        generators; by default a new one with a FastMaskDecoder in `decoder_dtype` and no cache.
    """

    predictor: FastSamPredictor

    def __init__(
        self,
        model: Sam,
        *args: Any,
        process_batch_size: int = 1,
        predictor: FastSamPredictor | None = None,
        decoder_dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self.process_batch_size = process_batch_size
        if predictor is None:
            predictor = FastSamPredictor(model, FastMaskDecoder(model.mask_decoder, decoder_dtype))
        self.predictor = predictor

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for one RGB uint8 (H, W, 3) image: the same records as the reference's `generate`."""
        mask_data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            nms = max(self.box_nms_thresh, self.crop_nms_thresh)
            mask_data = clean_small_regions(mask_data, self.min_mask_region_area, nms, self.postprocess_small_regions)
        return records(mask_data, self.output_mode)

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        predictor = self.predictor
        decoder = predictor.decoder
        transformed = predictor.transform.apply_coords(points, im_size)
        coords = torch.as_tensor(transformed, device=predictor.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, _ = self.predictor.model.prompt_encoder(
            points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        with predictor.clock.stage("mask_decoder"):
            tokens = decoder.run_transformer(predictor.image_state(), sparse)
        # Multimask output: mask tokens 1..3, flattened point-major like the reference.
        iou_preds = tokens.iou_pred[:, 1:].flatten()

        def low_res_of(pairs: torch.Tensor) -> torch.Tensor:
            with predictor.clock.stage("mask_decoder"):
                return decoder.mask_logits(tokens, torch.div(pairs, 3, rounding_mode="floor"), pairs % 3 + 1)

        return self.decode_kept(
            kept_pairs(iou_preds, self.pred_iou_thresh),
            low_res_of,
            predictor.upsample,
            predictor.masks_per_upsample(orig_size),
            iou_preds,
            torch.as_tensor(points).repeat_interleave(3, dim=0),  # stays on the CPU, as in the reference
            crop_box,
            orig_size,
            predictor.model.mask_threshold,
        )
