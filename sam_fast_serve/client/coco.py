"""COCO instances output for the client: the masks of an answer, the image size they cover, and
one dataset for a whole run, streamed from the per-image result files. Torch-free.

An annotation is a mask as the server sent it: its COCO RLE unchanged, so `COCO.annToMask` gives
back exactly the server's mask, with `score` = the mask's predicted IoU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tifffile
from PIL import Image

from sam_fast_serve.common.tiff import is_tiff

CATEGORY_ID = 1
CATEGORIES = [{"id": CATEGORY_ID, "name": "object", "supercategory": "object"}]
_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 turn the picture a quarter: the server applies them, so width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}


@dataclass(frozen=True)
class CocoImage:
    """One image of the dataset: its id, name, size, and the result file that holds its masks."""

    id: int
    file_name: str
    width: int
    height: int
    result: Path


def masks_of(payload: Any) -> list[dict[str, Any]]:
    """Every mask record of a decoded answer, in order: the annotation list itself, or for a
    prompted answer ({"prompts": [{"masks": [...]}, ...]}) the masks of every prompt."""
    if isinstance(payload, dict):
        return [mask for prompt in payload["prompts"] for mask in prompt["masks"]]
    return list(payload)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mask_size(mask: Any) -> tuple[int, int]:
    """(width, height) of one mask record; ValueError when it lacks what an annotation needs."""
    rle = mask.get("segmentation") if isinstance(mask, dict) else None
    size = rle.get("size") if isinstance(rle, dict) else None
    if not (
        isinstance(rle, dict)
        and isinstance(rle.get("counts"), str)
        and isinstance(size, list)
        and len(size) == 2
        and all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise ValueError("a mask's segmentation is not a COCO RLE {'size': [h, w], 'counts': str}")
    bbox = mask.get("bbox")
    if not (
        _is_number(mask.get("area"))
        and _is_number(mask.get("predicted_iou"))
        and isinstance(bbox, list)
        and len(bbox) == 4
        and all(map(_is_number, bbox))
    ):
        raise ValueError("a mask lacks a numeric area, predicted_iou or [x, y, w, h] bbox")
    height, width = size
    return width, height


def mask_size(payload: Any) -> tuple[int, int] | None:
    """(width, height) of the image the masks of `payload` cover; None when it has no mask.

    Raises ValueError when a mask lacks what a COCO annotation needs (an RLE with str counts, a
    numeric area and predicted_iou, a 4-number bbox) or when the masks disagree on the size.
    """
    sizes = {_mask_size(mask) for mask in masks_of(payload)}
    if len(sizes) > 1:
        raise ValueError(f"the masks cover images of different sizes: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def header_size(path: Path, page: int = 0) -> tuple[int, int]:
    """(width, height) of the image file at `path` as the server sees it, from the header alone:
    page `page` of a TIFF; otherwise swapped when the EXIF orientation turns the picture a
    quarter. Raises OSError when the header cannot be read."""
    with open(path, "rb") as f:
        if is_tiff(f.read(4)):
            try:
                with tifffile.TiffFile(path) as tif:
                    header = tif.pages[page]
                    if not isinstance(header, tifffile.TiffPage):
                        raise ValueError(f"page {page} is a frame of another page")
                    return header.imagewidth, header.imagelength
            except Exception as exc:  # tifffile raises many types for a broken file
                raise OSError(f"cannot read the TIFF header: {exc}") from exc
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def write_coco(stream: TextIO, images: Sequence[CocoImage]) -> int:
    """Write one COCO instances dataset for `images` to `stream`; returns the annotation count.

    The image list is small and written first; the annotations are streamed, one result file read
    at a time, so the run's masks are never all in memory. Annotation ids are 1-based in image
    order. Raises OSError or ValueError when a result file cannot be read.
    """
    stream.write('{"images": [')
    for n, image in enumerate(images):
        entry = {"id": image.id, "file_name": image.file_name, "width": image.width, "height": image.height}
        stream.write((",\n" if n else "\n") + json.dumps(entry))
    stream.write('\n],\n"annotations": [\n')
    count = 0
    for image in images:
        with open(image.result) as f:
            masks = masks_of(json.load(f))
        for mask in masks:
            count += 1
            annotation = {
                "id": count,
                "image_id": image.id,
                "category_id": CATEGORY_ID,
                "segmentation": mask["segmentation"],
                "area": mask["area"],
                "bbox": mask["bbox"],
                "iscrowd": 0,
                "score": mask["predicted_iou"],
            }
            stream.write((",\n" if count > 1 else "") + json.dumps(annotation))
    stream.write('\n],\n"categories": ' + json.dumps(CATEGORIES) + "}\n")
    return count
