"""SAM2AutomaticMaskGenerator with many prompts per decoder call on a pinned embedding, early IoU
filtering and RLE by pycocotools' C encoder (models.amg).

It subclasses sam2's generator and keeps its crop handling, point grids and NMS; what changes is
the predictor (Sam2Predictor: embeddings pinned in batches of `process_batch_size` or from the
store) and the per-batch work (`_process_batch`): the reference upsamples every mask of a batch
to the image before filtering by predicted IoU, encodes RLE in a Python loop, and deep-copies the
run-length lists at every concatenation (MaskData.cat), which took half its time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as ReferenceGenerator
from sam2.modeling.sam2_base import SAM2Base
from segment_anything.utils.amg import MaskData

from sam_fast_serve.models.amg import (
    MASKS_PER_DECODE,
    BatchedGeneration,
    kept_pairs,
    records,
    upsample_chunk,
)
from sam_fast_serve.models.budget import items_that_fit
from sam_fast_serve.models.prompted import LOGIT_CLAMP
from sam_fast_serve.models.sam2.predictor import Sam2Predictor


class Sam2AutomaticMaskGenerator(BatchedGeneration, ReferenceGenerator):
    """Drop-in for sam2's SAM2AutomaticMaskGenerator (same arguments and records), plus:

    process_batch_size: images (or crops) per image-encoder call in `pinned` / `generate_batch`.
    predictor: a Sam2Predictor for `model`, to share its embedding store between generators; by
        default a new one in `dtype` with no store.
    """

    predictor: Sam2Predictor

    def __init__(
        self,
        model: SAM2Base,
        *args: Any,
        process_batch_size: int = 1,
        predictor: Sam2Predictor | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self.process_batch_size = process_batch_size
        self.predictor = predictor if predictor is not None else Sam2Predictor(model, dtype)

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for one RGB uint8 (H, W, 3) image: the same records as the reference's `generate`
        (SAM 2's generator has no small-region pass after it: min_mask_region_area fills holes
        and removes sprinkles in the low-res logits, in `_process_batch`)."""
        return records(self._generate_masks(image), self.output_mode)

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
        normalize: bool = False,
    ) -> MaskData:
        predictor = self.predictor
        assert normalize, "sam2's _process_crop passes points in pixels of the crop"
        points_t = torch.as_tensor(points, dtype=torch.float32, device=predictor.device)
        coords = predictor.model_coords(points_t)
        labels = torch.ones(len(points_t), dtype=torch.int, device=predictor.device)
        if self.multimask_output and not self.use_m2m:
            # Mask tokens 1..3, flattened point-major like the reference; logits only for the
            # masks that pass the IoU threshold (the reference drops the others after upsampling).
            tokens = predictor.tokens(coords[:, None], labels[:, None])
            iou_preds = tokens.iou_pred[:, 1:].flatten()
            points_t = points_t.repeat_interleave(3, dim=0)

            def low_res_of(rows: torch.Tensor) -> torch.Tensor:
                return predictor.logits(tokens, torch.div(rows, 3, rounding_mode="floor"), rows % 3 + 1)
        else:
            low_res, iou_preds = predictor.decode(coords[:, None], labels[:, None], self.multimask_output)
            per_point = low_res.shape[1]
            low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)
            points_t = points_t.repeat_interleave(per_point, dim=0)
            if self.use_m2m:
                low_res, iou_preds = self._refine(coords.repeat_interleave(per_point, dim=0), low_res)

            def low_res_of(rows: torch.Tensor) -> torch.Tensor:
                return low_res[rows]

        return self.decode_kept(
            kept_pairs(iou_preds, self.pred_iou_thresh),
            low_res_of,
            lambda logits: predictor.upsample(logits, self.min_mask_region_area),
            upsample_chunk(predictor.device, orig_size[0] * orig_size[1]),
            iou_preds,
            points_t,
            crop_box,
            orig_size,
            self.mask_threshold,
        )

    def _refine(self, coords: torch.Tensor, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """use_m2m: each mask's point again, its own (clamped) low-res logits as the mask prompt, one
        mask each (the reference's refine_with_m2m), `points_per_batch` prompts per decoder call (fewer
        where models.budget fits fewer)."""
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        refined, ious = [], []
        # SAM 2's decoder repeats the image's tokens for each prompt.
        assert self.predictor.features is not None
        embed = self.predictor.features["image_embed"]
        fitting = items_that_fit(embed.numel() * embed.element_size(), embed.device)
        step = min(self.points_per_batch, MASKS_PER_DECODE, fitting)
        for start in range(0, len(coords), step):
            part = slice(start, start + step)
            masks, iou = self.predictor.decode(
                coords[part, None],
                labels[part, None],
                False,
                mask_input=low_res[part, None].clamp(-LOGIT_CLAMP, LOGIT_CLAMP),
            )
            refined.append(masks[:, 0])
            ious.append(iou[:, 0])
        return torch.cat(refined), torch.cat(ious)
