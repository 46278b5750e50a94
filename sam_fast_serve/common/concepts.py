"""Concept requests (SAM 3): every instance of a named thing, or of what example boxes show.

A request with `text` and/or `exemplar_boxes` asks a concept model (model_type sam3) for the masks
of every instance of each concept:

    text             one phrase ("nucleus") or a list of different ones: each phrase is its own
                     concept, and its records name it as sent
    exemplar_boxes   [[x0, y0, x1, y1], ...] in image pixels: examples of the concept (they join
                     every phrase; without `text` they are one concept of their own, named "visual")
    exemplar_labels  1 (an example of the concept, the default) or 0 (not one), one per box
    threshold        the score an instance needs to be kept (SAM 3's 0.3)
    mask_threshold   the mask probability a pixel needs to be in the mask (SAM 3's 0.5)
    max_instances    at most this many instances a concept (the best by score)

The answer is a list of records, like automatic mask generation's (segmentation as COCO RLE, area,
bbox XYWH, score), each with the `concept` it belongs to; the records of a concept are sorted by
score, best first, and the concepts come in the request's order. Every failure is a 422 naming the
field. Torch free: the client builds and checks its requests with this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_fast_serve.common.errors import InvalidOption

CONCEPT_FIELDS = ("text", "exemplar_boxes", "exemplar_labels", "threshold", "mask_threshold", "max_instances")
# Which of them ask for a concept answer (the others qualify it).
CONCEPT_KINDS = ("text", "exemplar_boxes")
# SAM 3's name for a concept given by example boxes alone (transformers' Sam3Processor's too).
EXEMPLAR_CONCEPT = "visual"
THRESHOLD = 0.3
MASK_THRESHOLD = 0.5
MAX_CONCEPTS = 16
MAX_EXEMPLARS = 16
# Characters a phrase may have; the model's tokenizer bounds its tokens too (the server checks).
MAX_TEXT_CHARS = 200


@dataclass(frozen=True)
class Concepts:
    """A validated concept request: the phrases (each a concept; (EXEMPLAR_CONCEPT,) for exemplars
    alone), exemplar boxes (B, 4) XYXY pixels and labels (B,) or None, the thresholds, the cap."""

    texts: tuple[str, ...]
    boxes: np.ndarray | None
    labels: np.ndarray | None
    threshold: float = THRESHOLD
    mask_threshold: float = MASK_THRESHOLD
    max_instances: int | None = None


def has_concepts(options: Mapping[str, Any]) -> bool:
    return any(kind in options for kind in CONCEPT_KINDS)


def split_concept_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the concept fields of a request's options."""
    return {name: options.pop(name) for name in CONCEPT_FIELDS if name in options}


def _texts(value: Any) -> tuple[str, ...]:
    phrases = [value] if isinstance(value, str) else value
    if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) for p in phrases):
        raise InvalidOption(f"'text' must be a phrase or a non-empty list of phrases (strings), got {value!r:.80}")
    if len(phrases) > MAX_CONCEPTS:
        raise InvalidOption(f"'text' has {len(phrases)} phrases; at most {MAX_CONCEPTS} concepts a request")
    if len(set(phrases)) < len(phrases):
        raise InvalidOption("'text' names a phrase twice: each phrase is one concept, named by it in the answer")
    for phrase in phrases:
        if not phrase.strip():
            raise InvalidOption("'text' has an empty phrase: name the thing to find, e.g. \"nucleus\"")
        if len(phrase) > MAX_TEXT_CHARS:
            raise InvalidOption(f"'text' has a phrase of {len(phrase)} characters; at most {MAX_TEXT_CHARS}")
    return tuple(phrases)


def _fraction(fields: Mapping[str, Any], name: str, default: float) -> float:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidOption(f"'{name}' must be a number from 0 to 1, got {value!r:.80}")
    return float(value)


def _exemplars(fields: Mapping[str, Any], image_size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        boxes = np.asarray(fields["exemplar_boxes"], dtype=np.float64)
    except (TypeError, ValueError):
        boxes = np.zeros((0,))
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0 or not np.isfinite(boxes).all():
        raise InvalidOption("'exemplar_boxes' must be a non-empty list like [[x0, y0, x1, y1], ...] of finite numbers")
    if len(boxes) > MAX_EXEMPLARS:
        raise InvalidOption(f"'exemplar_boxes' has {len(boxes)} boxes; at most {MAX_EXEMPLARS} are allowed")
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]) | (boxes[:, :2] < 0).any(axis=1)
    if image_size is not None:
        height, width = image_size
        bad |= (boxes[:, 2] > width) | (boxes[:, 3] > height)
    if bad.any():
        inside = f", inside the {image_size[1]}x{image_size[0]} image" if image_size is not None else ""
        raise InvalidOption(
            f"'exemplar_boxes' has {boxes[int(np.argmax(bad))].tolist()}: each box must be [x0, y0, x1, y1] "
            f"with x0 < x1 and y0 < y1{inside}"
        )
    raw = fields.get("exemplar_labels", [1] * len(boxes))
    labels = np.asarray(raw) if isinstance(raw, list) else np.zeros((0,))
    if labels.shape != (len(boxes),) or labels.dtype == bool or not np.isin(labels, (0, 1)).all():
        raise InvalidOption(
            f"'exemplar_labels' must be a list of {len(boxes)} values, 1 (an example of the concept) or 0 "
            "(not one), one per exemplar box"
        )
    return boxes, labels.astype(np.int64)


def parse_concepts(fields: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> Concepts:
    """Validate concept fields, the exemplar boxes against an image of `image_size` (H, W) when it
    is known (a request by image_id is checked again once its embedding gives the size).

    Raises InvalidOption (422) naming the field.
    """
    if not has_concepts(fields):
        raise InvalidOption("a concept request needs 'text' or 'exemplar_boxes'")
    texts = _texts(fields["text"]) if "text" in fields else (EXEMPLAR_CONCEPT,)
    boxes = labels = None
    if "exemplar_boxes" in fields:
        boxes, labels = _exemplars(fields, image_size)
    elif "exemplar_labels" in fields:
        raise InvalidOption("'exemplar_labels' given without 'exemplar_boxes'")
    cap = fields.get("max_instances")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise InvalidOption(f"'max_instances' must be a whole number of at least 1, got {cap!r:.80}")
    return Concepts(
        texts,
        boxes,
        labels,
        _fraction(fields, "threshold", THRESHOLD),
        _fraction(fields, "mask_threshold", MASK_THRESHOLD),
        cap,
    )
