"""Masks for point and box prompts on a predictor's current image, as builtins for the wire (any family)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from pycocotools import mask as mask_utils

from sam_fast_serve.common.prompts import Prompts, logits_payload
from sam_fast_serve.common.records import mask_record, rle_to_builtins
from sam_fast_serve.models.rle import rle_areas, rles_in_turn

# The low-res logits an answer returns and a mask prompt takes are clamped, as SAM 2's predictor does.
LOGIT_CLAMP = 32.0


class PromptPredictor(Protocol):
    """A family's predictor, with an image set: the masks of validated prompts on it."""

    def predict_prompts(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, C, H, W) boolean masks at the image's size, their predicted IoUs (P, C) and low-res
        logits (P, C, h, w); P = prompts.count, C = 3 with prompts.multimask, else 1."""
        ...


def thresholded_masks(
    upsample: Callable[[torch.Tensor], torch.Tensor],
    low_res: torch.Tensor,
    threshold: float,
    size: Sequence[int],
    per_chunk: int,
) -> torch.Tensor:
    """(B, C, h, w) low-res logits -> (B, C, H, W) boolean masks `upsample(logits) > threshold` at
    the image's `size`, `upsample` taking (k, 1, h, w) `per_chunk` masks at a time (amg.upsample_chunk),
    so that their float logits never exist whole. The masks are column-major, as the RLE encoder
    reads them."""
    height, width = int(size[0]), int(size[1])
    flat = low_res.flatten(0, 1)[:, None]
    masks = torch.empty((len(flat), width, height), dtype=torch.bool, device=low_res.device).transpose(1, 2)
    for start in range(0, len(flat), per_chunk):
        chunk = slice(start, start + per_chunk)
        torch.gt(upsample(flat[chunk])[:, 0], threshold, out=masks[chunk])
    return masks.view(*low_res.shape[:2], height, width)


@torch.no_grad()
def segment_prompts(predictor: PromptPredictor, prompts: Prompts) -> list[dict[str, Any]]:
    """One entry per prompt (per box, or one for points alone): its masks as COCO RLE with area,
    XYWH bbox and predicted IoU, plus the low-res logits when `prompts.return_logits`.

    The predictor must have the image set; prompt coordinates are in original-image pixels.
    """
    masks, iou, low_res = predictor.predict_prompts(prompts)
    # One copy each of the scores and logits, the masks a prompt ahead (rle.rles_in_turn): on CUDA
    # the host does not wait for the device prompt by prompt.
    scores = iou.tolist()
    logits = low_res.float().cpu().numpy() if prompts.return_logits else None
    results = []
    for prompt, rles in enumerate(rles_in_turn(masks)):
        entry: dict[str, Any] = {
            "masks": [
                mask_record(rle_to_builtins(rle), area, box, score)
                for rle, area, box, score in zip(rles, rle_areas(rles), mask_utils.toBbox(rles), scores[prompt])
            ]
        }
        if logits is not None:
            entry["low_res_logits"] = logits_payload(logits[prompt])
        results.append(entry)
    return results
