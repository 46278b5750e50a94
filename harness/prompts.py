"""Prompt requests tests send, and segment_anything's answer to them (the reference)."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor

CASES = {
    "single point": {"points": [[200.0, 150.0]]},
    "mixed points": {"points": [[200.0, 150.0], [320.0, 400.0], [60.0, 80.0]], "labels": [1, 0, 1]},
    "one box": {"boxes": [[100.0, 50.0, 400.0, 460.0]]},
    "several boxes": {"boxes": [[100.0, 50.0, 400.0, 460.0], [10.0, 300.0, 200.0, 500.0], [250.0, 20.0, 500.0, 200.0]]},
    "box and points": {
        "boxes": [[100.0, 50.0, 400.0, 460.0]],
        "points": [[250.0, 250.0], [120.0, 70.0]],
        "labels": [1, 0],
    },
}


def reference_answer(predictor: SamPredictor, case: dict, multimask: bool):
    """(masks (B, C, H, W) bool, scores (B, C)) from segment_anything for one request's prompts."""
    size = predictor.original_size
    boxes = case.get("boxes")
    count = len(boxes) if boxes else 1
    coords = labels = box_t = None
    if "points" in case:
        coords = torch.as_tensor(predictor.transform.apply_coords(np.array(case["points"]), size), dtype=torch.float)
        coords = coords[None].expand(count, -1, -1)
        labels = torch.as_tensor(case.get("labels", [1] * len(case["points"])))[None].expand(count, -1)
    if boxes:
        box_t = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), size)
    masks, scores, _ = predictor.predict_torch(coords, labels, box_t, multimask_output=multimask)
    return masks.cpu().numpy(), scores.cpu().numpy()
