"""Thresholds that make automatic mask generation keep a chosen share of an image's (point, mask) pairs.

Random weights predict IoUs far below the default `pred_iou_thresh`, so at the defaults no mask is
kept and the mask head, upsampling, stability, RLE and the wire never run. Real weights keep a
large share of a photo's pairs. The benchmarks place `pred_iou_thresh` at a quantile of the image's
own predicted IoUs instead, so that a chosen share of the pairs goes through the whole path
(stability filter off, NMS on at its default), for the reference and every engine alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_point_grid

from sam_fast_serve.models.fast_decoder import FastMaskDecoder
from sam_fast_serve.models.sam1.predictor import FastSamPredictor

SHARES = (0.0, 0.1, 0.3, 0.6, 1.0)


def predicted_ious(sam: Sam, image: np.ndarray, points_per_side: int) -> np.ndarray:
    """The multimask IoU predictions of every (point, mask) pair of the generator's single-layer grid
    on `image` (RGB uint8), from the fast decoder in fp32 (equal to segment_anything's up to rounding)."""
    predictor = FastSamPredictor(sam, FastMaskDecoder(sam.mask_decoder, torch.float32))
    with torch.no_grad():
        predictor.set_image(image)
        height, width = image.shape[:2]
        points = build_point_grid(points_per_side) * np.array([width, height])
        coords = torch.as_tensor(predictor.transform.apply_coords(points, (height, width)))
        labels = torch.ones(len(points), dtype=torch.int)
        sparse, _ = sam.prompt_encoder(points=(coords[:, None], labels[:, None]), boxes=None, masks=None)
        tokens = predictor.decoder.run_transformer(predictor.image_state(), sparse)
    return tokens.iou_pred[:, 1:].flatten().numpy()


def share_settings(ious: np.ndarray, share: float) -> dict[str, Any]:
    """Generator arguments under which `share` (0 to 1) of the pairs with IoU predictions `ious` pass
    the IoU filter; the stability filter is off so that it removes none of them."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within 0 and 1, got {share}")
    if share == 1.0:
        threshold = 0.0  # the generators filter by IoU only above 0
    elif share == 0.0:
        threshold = float(ious.max()) + 1e-3
    else:
        threshold = float(np.quantile(ious, 1.0 - share))
    if 0.0 < share < 1.0 and threshold <= 0.0:
        raise ValueError(f"the IoU quantile for {share:.0%} is {threshold:.3f}: the generators would not filter")
    return {"pred_iou_thresh": threshold, "stability_score_thresh": 0.0}


def pairs_kept(ious: np.ndarray, settings: dict[str, Any]) -> float:
    """The share of `ious` that passes the IoU filter of `settings`."""
    threshold = settings["pred_iou_thresh"]
    return float((ious > threshold).mean()) if threshold > 0.0 else 1.0
