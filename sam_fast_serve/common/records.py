"""The mask records a response carries, built from Python builtins only (no torch, no numpy).

An automatic answer is a list of `amg_record`s, the records of segment_anything's
SamAutomaticMaskGenerator in its coco_rle mode; a prompted answer holds `mask_record`s, a concept
answer is a list of `concept_record`s, and a video answer an `object_record` per object on each frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The keys of every automatic record, in segment_anything's order.
ANNOTATION_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box")


def rle_to_builtins(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A COCO RLE with counts as str and size as ints: what the wire carries."""
    counts = rle["counts"]
    return {
        "size": [int(s) for s in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _floats(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values]


def mask_record(segmentation: Any, area: Any, bbox: Iterable[Any], predicted_iou: Any) -> dict[str, Any]:
    """One prompted mask: its segmentation as given, area in pixels, XYWH bbox, predicted IoU."""
    return {
        "segmentation": segmentation,
        "area": int(area),
        "bbox": _floats(bbox),
        "predicted_iou": float(predicted_iou),
    }


def amg_record(
    segmentation: Any,
    area: Any,
    bbox: Iterable[Any],
    predicted_iou: Any,
    point_coords: Iterable[Iterable[Any]],
    stability_score: Any,
    crop_box: Iterable[Any],
) -> dict[str, Any]:
    """One automatic mask with the keys of ANNOTATION_KEYS; numbers as builtins, the segmentation
    as given (a `rle_to_builtins` RLE on the wire)."""
    record = mask_record(segmentation, area, bbox, predicted_iou)
    record.update(
        point_coords=[_floats(point) for point in point_coords],
        stability_score=float(stability_score),
        crop_box=_floats(crop_box),
    )
    return record


def object_record(obj: int, segmentation: Any, area: Any, bbox: Iterable[Any], score: Any) -> dict[str, Any]:
    """One tracked object on one frame (common.tracks): its id, its mask as given, area in pixels,
    XYWH bbox, and the probability that it is in the frame."""
    return {
        "object": int(obj),
        "segmentation": segmentation,
        "area": int(area),
        "bbox": _floats(bbox),
        "score": float(score),
    }


def concept_record(concept: str, segmentation: Any, area: Any, bbox: Iterable[Any], score: Any) -> dict[str, Any]:
    """One instance of a concept (common.concepts): its mask as given, area in pixels, XYWH bbox,
    score (SAM 3's: the instance's probability times the concept's presence), and its concept."""
    return {
        "segmentation": segmentation,
        "area": int(area),
        "bbox": _floats(bbox),
        "score": float(score),
        "concept": concept,
    }
