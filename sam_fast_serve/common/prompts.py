"""Prompted requests: point / box prompts in original-image pixels, validated against the image,
and mask prompts (low-resolution logits, as an answer's `low_res_logits` carries them).

A request with `points`, `boxes` and/or `mask_input` asks for the masks of those prompts instead of
automatic mask generation. Without boxes, all points form one prompt; with boxes, each box is one
prompt and the points (if any) join every box; a mask prompt joins the one prompt there may be.
Every failure is a 422 naming the field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_fast_serve.common.errors import InvalidOption

PROMPT_FIELDS = ("points", "labels", "boxes", "mask_input", "multimask", "return_logits")
# Which of them ask for prompted masks (the others qualify a prompt).
PROMPT_KINDS = ("points", "boxes", "mask_input")
# A mask prompt is low-resolution logits, as an answer's `low_res_logits` carries them, of the
# model's side (models.registry.ModelType.mask_input_side: 256 for SAM 1 and SAM 2.1, 288 for
# SAM 3). Where the model is not known (the client's checks), any side up to this.
MAX_MASK_INPUT_SIDE = 1024
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
    # (side, side) float32 logits: a mask prompt, e.g. one mask of an earlier answer's low_res_logits.
    mask_input: np.ndarray | None = None

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
    return any(kind in options for kind in PROMPT_KINDS)


def logits_payload(array: np.ndarray) -> dict[str, Any]:
    """A float array as the wire carries logits: shape, dtype float32, little-endian bytes in base64."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(data.shape), "dtype": "float32", "data": base64.b64encode(data.tobytes()).decode("ascii")}


def _mask_input(value: Any, side: int | None) -> np.ndarray:
    """The (side, side) float32 logits of a `mask_input` field in `logits_payload` form, shape
    [side, side] or [1, side, side]; any square side up to MAX_MASK_INPUT_SIDE when `side` is None."""
    shape = value.get("shape") if isinstance(value, dict) else None
    if side is None and isinstance(shape, list) and shape and isinstance(shape[-1], int):
        side = shape[-1] if 0 < shape[-1] <= MAX_MASK_INPUT_SIDE else None
    named = "side" if side is None else str(side)
    usage = (
        f"'mask_input' must be {{'shape': [1, {named}, {named}], 'dtype': 'float32', 'data': <base64>}}, "
        "one mask of an answer's low_res_logits"
    )
    if not isinstance(value, dict) or value.get("dtype") != "float32" or not isinstance(value.get("data"), str):
        raise InvalidOption(usage)
    if side is None or shape not in ([side, side], [1, side, side]):
        raise InvalidOption(f"{usage}; got shape {shape!r}")
    expected = side * side * 4
    if len(value["data"]) > 4 * (expected // 3 + 1):  # checked before decoding: no large allocation
        raise InvalidOption(
            f"{usage}; its data has {len(value['data'])} base64 characters, more than {expected} bytes take"
        )
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidOption(f"{usage}; its data is not base64") from None
    if len(raw) != expected:
        raise InvalidOption(f"{usage}; its data holds {len(raw)} bytes, not {expected}")
    logits = np.frombuffer(raw, dtype="<f4").reshape(side, side).astype(np.float32)
    if not np.isfinite(logits).all():
        raise InvalidOption("'mask_input' holds values that are not finite numbers")
    return logits


def split_prompt_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the prompt fields of a request's options."""
    return {name: options.pop(name) for name in PROMPT_FIELDS if name in options}


def parse_prompts(fields: Mapping[str, Any], image_size: tuple[int, int], mask_side: int | None) -> Prompts:
    """Validate prompt fields for an image of `image_size` (H, W) and a model whose mask prompts
    are `mask_side` logits a side (None: any square side, for checks made without the model).

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
    mask_input = _mask_input(fields["mask_input"], mask_side) if "mask_input" in fields else None
    if points is None and boxes is None and mask_input is None:
        raise InvalidOption("a prompted request needs 'points', 'boxes' or 'mask_input'")
    if mask_input is not None and boxes is not None and len(boxes) > 1:
        raise InvalidOption("'mask_input' is one mask prompt: give it with at most one box")
    # SAM's advice: several masks for a lone click (it is ambiguous), one mask otherwise.
    single_click = boxes is None and points is not None and len(points) == 1
    return Prompts(
        points,
        labels,
        boxes,
        _flag(fields, "multimask", single_click),
        _flag(fields, "return_logits", False),
        mask_input,
    )
