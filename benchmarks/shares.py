"""Thresholds that make automatic mask generation keep a chosen share of an image's (point, mask) pairs.

Random weights predict IoUs far below the default `pred_iou_thresh`, so at the defaults no mask is
kept and the mask head, upsampling, stability, RLE and the wire never run. Real weights keep a
large share of a photo's pairs. The benchmarks place `pred_iou_thresh` at a quantile of the image's
own predicted IoUs instead, so that a chosen share of the pairs goes through the whole path
(stability filter off, NMS on at its default), for the reference and every engine alike; or keep
every pair with "all" (thresholds 0, NMS off). A --shares token is a share from 0 to 1, or "all".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_point_grid

from harness.archives import KEEP_ALL
from sam_fast_serve.models.fast_decoder import DecodedTokens, FastMaskDecoder
from sam_fast_serve.models.sam1.predictor import FastSamPredictor
from sam_fast_serve.models.sam2.predictor import Sam2Predictor

SHARES = (0.0, 0.1, 0.3, 0.6, 1.0)
KEEP_ALL_LABEL = "keep-all"


def _grid_tokens(model: Sam | SAM2Base, image: np.ndarray, points: np.ndarray) -> DecodedTokens:
    """The fast decoder's transformer and IoU head in fp32 for one positive point each, `points`
    (N, 2) in pixels of `image`: the family's own predictor maps them to the model's frame."""
    labels = torch.ones(len(points), 1, dtype=torch.int)
    if isinstance(model, SAM2Base):
        sam2 = Sam2Predictor(model, torch.float32)
        sam2.set_image(image)
        return sam2.tokens(sam2.model_coords(torch.as_tensor(points))[:, None], labels)
    sam1 = FastSamPredictor(model, FastMaskDecoder(model.mask_decoder, torch.float32))
    sam1.set_image(image)
    coords = torch.as_tensor(sam1.transform.apply_coords(points, image.shape[:2]))
    sparse, _ = model.prompt_encoder(points=(coords[:, None], labels), boxes=None, masks=None)
    return sam1.decoder.run_transformer(sam1.image_state(), sparse)


def predicted_ious(model: Sam | SAM2Base, image: np.ndarray, points_per_side: int) -> np.ndarray:
    """The multimask IoU predictions of every (point, mask) pair of the generator's single-layer grid
    on `image` (RGB uint8), for a SAM 1 or SAM 2 model, from the fast decoder in fp32 (equal to the
    family's own decoder up to rounding)."""
    height, width = image.shape[:2]
    with torch.no_grad():
        tokens = _grid_tokens(model, image, build_point_grid(points_per_side) * np.array([width, height]))
    return tokens.iou_pred[:, 1:].flatten().numpy()


def share_settings(ious: np.ndarray, share: float) -> dict[str, Any]:
    """Generator arguments under which `share` (0 to 1) of the pairs with IoU predictions `ious` pass
    the IoU filter; the stability filter is off so that it removes none of them."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within 0 and 1, got {share}")
    if share == 1.0:
        threshold = 0.0  # the generators filter by IoU only above 0
    elif share == 0.0:
        # Above every prediction, and above 0 where all are negative (vit_h's random weights).
        threshold = max(float(ious.max()), 0.0) + 1e-3
    else:
        threshold = float(np.quantile(ious, 1.0 - share))
    if 0.0 < share < 1.0 and threshold <= 0.0:
        raise ValueError(f"the IoU quantile for {share:.0%} is {threshold:.3f}: the generators would not filter")
    return {"pred_iou_thresh": threshold, "stability_score_thresh": 0.0}


def pairs_kept(ious: np.ndarray, settings: dict[str, Any]) -> float:
    """The share of `ious` that passes the IoU filter of `settings`."""
    threshold = settings["pred_iou_thresh"]
    return float((ious > threshold).mean()) if threshold > 0.0 else 1.0


def share_label(token: str) -> str:
    """How a --shares token ("0", "0.3", "all") is named in the tables: "0%", "30%", "keep-all"."""
    return KEEP_ALL_LABEL if token == "all" else f"{float(token):.0%}"


def sweep_setting(token: str, ious: list[np.ndarray], base: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """(label, table title, each image's generator arguments: `base` and the thresholds) for a
    --shares token, given each image's predicted IoUs."""
    if token == "all":
        title = f"{KEEP_ALL_LABEL}: thresholds 0, NMS off, every mask to the wire"
        return KEEP_ALL_LABEL, title, [{**base, **KEEP_ALL} for _ in ious]
    share, label = float(token), share_label(token)
    settings = [{**base, **share_settings(i, share)} for i in ious]
    kept = np.mean([pairs_kept(i, s) for i, s in zip(ious, settings, strict=True)])
    return label, f"{label} kept ({kept:.1%} of the pairs pass the IoU filter, NMS on)", settings
