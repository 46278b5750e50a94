"""Mask agreement between two lists of COCO-RLE annotations (used by tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

from pycocotools import mask as mask_utils


def _point_key(ann: dict) -> tuple[float, float]:
    x, y = ann["point_coords"][0]
    return round(float(x), 3), round(float(y), 3)


def match_masks(reference: Sequence[dict], candidate: Sequence[dict]) -> tuple[list[float], int, int]:
    """Pair masks one to one by their prompt point, then by best IoU among that point's masks.

    Returns (the IoU of each reference mask with its partner (0.0 when it has none), number of
    reference masks without a partner, number of candidate masks left over).
    """
    by_point: dict[tuple[float, float], list[dict]] = {}
    for ann in candidate:
        by_point.setdefault(_point_key(ann), []).append(ann)
    ious: list[float] = []
    unmatched = 0
    for ann in reference:
        pool = by_point.get(_point_key(ann), [])
        if not pool:
            ious.append(0.0)
            unmatched += 1
            continue
        scores = mask_utils.iou([c["segmentation"] for c in pool], [ann["segmentation"]], [0])
        # pycocotools gives 0 for two empty masks; they are the same mask.
        empty = mask_utils.area([c["segmentation"] for c in pool]) == 0
        if mask_utils.area(ann["segmentation"]) == 0:
            scores[empty, 0] = 1.0
        best = int(scores.argmax())
        ious.append(float(scores[best, 0]))
        pool.pop(best)
    leftover = sum(len(pool) for pool in by_point.values())
    return ious, unmatched, leftover


def match_instances(reference: Sequence[dict], candidate: Sequence[dict]) -> list[tuple[float, float]]:
    """Pair instance records (a concept's, with `segmentation` and `score`) one to one: each
    reference record, best score first, with the candidate of its highest mask IoU still free.

    Returns (IoU, |score difference|) of each reference record, (0.0, inf) when no candidate is left.
    """
    pool = list(candidate)
    pairs: list[tuple[float, float]] = []
    for ann in sorted(reference, key=lambda a: -a["score"]):
        if not pool:
            pairs.append((0.0, float("inf")))
            continue
        scores = mask_utils.iou([c["segmentation"] for c in pool], [ann["segmentation"]], [0])[:, 0]
        best = int(scores.argmax())
        pairs.append((float(scores[best]), abs(pool[best]["score"] - ann["score"])))
        pool.pop(best)
    return pairs
