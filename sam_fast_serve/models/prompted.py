"""Masks for point and box prompts on a predictor's current image, as builtins for the wire (any family)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from pycocotools import mask as mask_utils

from sam_fast_serve.common.prompts import Prompts, logits_payload
from sam_fast_serve.common.records import mask_record, rle_to_builtins
from sam_fast_serve.models.rle import encode_masks, rle_areas


class PromptPredictor(Protocol):
    """A family's predictor, with an image set: the masks of validated prompts on it."""

    def predict_prompts(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, C, H, W) boolean masks at the image's size, their predicted IoUs (P, C) and low-res
        logits (P, C, h, w); P = prompts.count, C = 3 with prompts.multimask, else 1."""
        ...


@torch.no_grad()
def segment_prompts(predictor: PromptPredictor, prompts: Prompts) -> list[dict[str, Any]]:
    """One entry per prompt (per box, or one for points alone): its masks as COCO RLE with area,
    XYWH bbox and predicted IoU, plus the low-res logits when `prompts.return_logits`.

    The predictor must have the image set; prompt coordinates are in original-image pixels.
    """
    masks, iou, low_res = predictor.predict_prompts(prompts)
    results = []
    for prompt in range(masks.shape[0]):
        rles = encode_masks(masks[prompt])
        entry: dict[str, Any] = {
            "masks": [
                mask_record(rle_to_builtins(rle), area, box, score)
                for rle, area, box, score in zip(rles, rle_areas(rles), mask_utils.toBbox(rles), iou[prompt].tolist())
            ]
        }
        if prompts.return_logits:
            entry["low_res_logits"] = logits_payload(low_res[prompt].float().cpu().numpy())
        results.append(entry)
    return results
