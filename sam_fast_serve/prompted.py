"""Masks for point and box prompts on the predictor's current image, as builtins for the wire."""

from __future__ import annotations

import base64
from typing import Any

import torch
from pycocotools import mask as mask_utils

from .predictor import FastSamPredictor
from .prompts import Prompts
from .records import mask_record, rle_to_builtins
from .rle import encode_masks, rle_areas


def _logits_payload(logits: torch.Tensor) -> dict[str, Any]:
    array = logits.float().cpu().numpy().astype("<f4")
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(array.tobytes()).decode("ascii")}


@torch.no_grad()
def segment_prompts(predictor: FastSamPredictor, prompts: Prompts) -> list[dict[str, Any]]:
    """One entry per prompt (per box, or one for points alone): its masks as COCO RLE with area,
    XYWH bbox and predicted IoU, plus the low-res logits when `prompts.return_logits`.

    The predictor must have the image set; prompt coordinates are in original-image pixels.
    """
    size = predictor.original_size
    device = predictor.device
    coords = labels = boxes = None
    if prompts.points is not None:
        transformed = predictor.transform.apply_coords(prompts.points, size)
        coords = torch.as_tensor(transformed, dtype=torch.float, device=device)[None].expand(prompts.count, -1, -1)
        labels = torch.as_tensor(prompts.labels, device=device)[None].expand(prompts.count, -1)
    if prompts.boxes is not None:
        boxes = torch.as_tensor(predictor.transform.apply_boxes(prompts.boxes, size), dtype=torch.float, device=device)
    masks, iou, low_res = predictor.predict_torch(coords, labels, boxes, multimask_output=prompts.multimask)
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
            entry["low_res_logits"] = _logits_payload(low_res[prompt])
        results.append(entry)
    return results
