"""Instance label images: the masks of one answer painted into one uint16 image the size of the
input, 0 for background and 1, 2, ... for the masks in answer order (what CellProfiler, napari,
QuPath and Fiji load as labels). Shared by the client (--labels) and the server (Accept:
image/png), so both paint the same picture. Torch free.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

LABEL_FORMATS = {"png": ".labels.png", "tiff": ".labels.tif"}  # format -> file suffix
MAX_LABELS = np.iinfo(np.uint16).max


def label_image(masks: Sequence[Mapping[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """(height, width) uint16 labels of `masks` (records with a COCO RLE "segmentation", whose
    "size" must be `size`). Mask i (0-based, answer order) gets label i + 1. Overlaps go to the
    smaller mask: masks are painted largest first, so a small object on a large one stays visible.

    Raises ValueError for more than 65,535 masks or a mask of another size.
    """
    if len(masks) > MAX_LABELS:
        raise ValueError(f"{len(masks):,} masks do not fit a uint16 label image (at most {MAX_LABELS:,})")
    labels = np.zeros(size, np.uint16)
    areas = [int(mask_utils.area(coco_rle(mask))) for mask in masks]
    for index in sorted(range(len(masks)), key=lambda i: -areas[i]):
        rle = coco_rle(masks[index])
        if tuple(rle["size"]) != tuple(size):
            raise ValueError(f"mask {index} covers {tuple(rle['size'])}, not the image's {tuple(size)}")
        labels[mask_utils.decode(rle).astype(bool)] = index + 1
    return labels


def coco_rle(mask: Mapping[str, Any]) -> dict[str, Any]:
    """A mask record's segmentation as pycocotools takes it (counts as bytes)."""
    segmentation = mask["segmentation"]
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def encode_labels(labels: np.ndarray, kind: str) -> bytes:
    """A label image as file bytes: a 16-bit grayscale PNG ("png") or a zlib TIFF ("tiff")."""
    stream = io.BytesIO()
    if kind == "png":
        Image.fromarray(labels).save(stream, format="PNG")
    elif kind == "tiff":
        tifffile.imwrite(stream, labels, compression="zlib")
    else:
        raise ValueError(f"a label image is one of {', '.join(LABEL_FORMATS)}, not {kind!r}")
    return stream.getvalue()
