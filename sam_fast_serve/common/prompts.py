"""Prompted requests: point / box prompts in original-image pixels, validated against the image.

A request with `points` and/or `boxes` asks for the masks of those prompts instead of automatic
mask generation. Without boxes, all points form one prompt; with boxes, each box is one prompt
and the points (if any) join every box. Every failure is a 422 naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_fast_serve.common.errors import InvalidOption

PROMPT_FIELDS = ("points", "labels", "boxes", "multimask", "return_logits")
MAX_POINTS = 64
MAX_BOXES = 64


@dataclass(frozen=True)
class Prompts:
    """Validated prompts. points (N, 2) and labels (N,) or None; boxes (B, 4) XYXY or None."""

    points: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray | None
    multimask: bool
    return_logits: bool

    @property
    def count(self) -> int:
        """How many prompts (mask sets) the request asks for."""
        return len(self.boxes) if self.boxes is not None else 1


def _number_array(value: Any, field: str, width: int, limit: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros((0,))
    if array.ndim != 2 or array.shape[1] != width or len(array) == 0 or not np.isfinite(array).all():
        shape = "[[x, y], ...]" if width == 2 else "[[x0, y0, x1, y1], ...]"
        raise InvalidOption(f"'{field}' must be a non-empty list like {shape} of finite numbers")
    if len(array) > limit:
        raise InvalidOption(f"'{field}' has {len(array)} entries; at most {limit} are allowed")
    return array


def _flag(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name, default)
    if not isinstance(value, bool):
        raise InvalidOption(f"'{name}' must be true or false, got {value!r}")
    return value


def has_prompts(options: Mapping[str, Any]) -> bool:
    return "points" in options or "boxes" in options


def split_prompt_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the prompt fields of a request's options."""
    return {name: options.pop(name) for name in PROMPT_FIELDS if name in options}


def parse_prompts(fields: Mapping[str, Any], image_size: tuple[int, int]) -> Prompts:
    """Validate prompt fields for an image of `image_size` (H, W).

    Raises InvalidOption (422) naming the field: points outside the image, labels that do not
    match the points or are not 0/1, degenerate or outside boxes, too many prompts.
    """
    height, width = image_size
    points = labels = boxes = None
    if "points" in fields:
        points = _number_array(fields["points"], "points", 2, MAX_POINTS)
        outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
        if outside.any():
            x, y = points[int(np.argmax(outside))]
            raise InvalidOption(f"'points' has ({x:g}, {y:g}) outside the {width}x{height} image")
        raw_labels = fields.get("labels", [1] * len(points))
        labels = np.asarray(raw_labels) if isinstance(raw_labels, list) else np.zeros((0,))
        if labels.shape != (len(points),) or not np.isin(labels, (0, 1)).all() or labels.dtype == bool:
            raise InvalidOption(
                f"'labels' must be a list of {len(points)} values, 1 (foreground) or 0 (background), one per point"
            )
        labels = labels.astype(np.int64)
    elif "labels" in fields:
        raise InvalidOption("'labels' given without 'points'")
    if "boxes" in fields:
        boxes = _number_array(fields["boxes"], "boxes", 4, MAX_BOXES)
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        outside = (boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
        if degenerate.any() or outside.any():
            bad = boxes[int(np.argmax(degenerate | outside))].tolist()
            raise InvalidOption(
                f"'boxes' has {bad}: each box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, "
                f"inside the {width}x{height} image"
            )
    if points is None and boxes is None:
        raise InvalidOption("a prompted request needs 'points' or 'boxes'")
    # SAM's advice: several masks for a lone click (it is ambiguous), one mask otherwise.
    single_click = boxes is None and points is not None and len(points) == 1
    return Prompts(
        points, labels, boxes, _flag(fields, "multimask", single_click), _flag(fields, "return_logits", False)
    )
