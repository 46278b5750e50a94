"""COCO instances output for the client: the masks of an answer, the image size they cover, and
one dataset for a whole run, streamed from the per-image result files. Torch-free.

An annotation is a mask as the server sent it: its COCO RLE unchanged, so `COCO.annToMask` gives
back exactly the server's mask, with `score` = the mask's predicted IoU (a concept's record: its
score). The categories are one "object", or for a run of concept requests the concepts, in the
order asked, each annotation in the category of its record's `concept`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tifffile
from PIL import Image

from sam_fast_serve.common.tiff import is_tiff

CATEGORY_ID = 1
CATEGORIES = [{"id": CATEGORY_ID, "name": "object", "supercategory": "object"}]
# What a concept's record has beside a mask's segmentation, area and bbox (common.concepts).
CONCEPT_KEY, CONCEPT_SCORE = "concept", "score"
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


def score_key(mask: Mapping[str, Any]) -> str:
    """The key of a mask record's score: "score" for a concept's record (it has a "concept"),
    "predicted_iou" for the records of automatic masks and prompts."""
    return CONCEPT_SCORE if CONCEPT_KEY in mask else "predicted_iou"


def is_concept_list(payload: Any, concepts: Sequence[str]) -> bool:
    """Whether `payload` has the shape of a concept answer: a list of records, each with a COCO
    RLE segmentation (str counts) and a `concept` among `concepts` (what the request asked for).
    Their numbers are `mask_size`'s check."""
    return isinstance(payload, list) and all(
        isinstance(record, dict)
        and isinstance(record.get("segmentation"), dict)
        and isinstance(record["segmentation"].get("counts"), str)
        and record.get(CONCEPT_KEY) in concepts
        for record in payload
    )


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
    score = score_key(mask)
    if not (
        _is_number(mask.get("area"))
        and _is_number(mask.get(score))
        and isinstance(bbox, list)
        and len(bbox) == 4
        and all(map(_is_number, bbox))
    ):
        raise ValueError(f"a mask lacks a numeric area, {score} or [x, y, w, h] bbox")
    height, width = size
    return width, height


def mask_size(payload: Any) -> tuple[int, int] | None:
    """(width, height) of the image the masks of `payload` cover; None when it has no mask.

    Raises ValueError when a mask lacks what a COCO annotation needs (an RLE with str counts, a
    numeric area and predicted_iou, or score for a concept's record, a 4-number bbox) or when the
    masks disagree on the size.
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


def categories(concepts: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The COCO categories of a run: one per concept (ids 1, 2, ... in the order asked), or
    CATEGORIES (one "object") for a run without concepts."""
    if not concepts:
        return CATEGORIES
    return [{"id": n, "name": name, "supercategory": "object"} for n, name in enumerate(concepts, 1)]


def _category_id(mask: Mapping[str, Any], ids: Mapping[str, int]) -> int:
    """The category of one mask record: its concept's id when the run has concepts (`ids`)."""
    if not ids:
        return CATEGORY_ID
    concept = mask.get(CONCEPT_KEY)
    if not isinstance(concept, str) or concept not in ids:
        raise ValueError(f"a mask of concept {concept!r:.80} is none of the run's concepts ({', '.join(ids)})")
    return ids[concept]


def write_coco(stream: TextIO, images: Sequence[CocoImage], concepts: Sequence[str] = ()) -> int:
    """Write one COCO instances dataset for `images` to `stream`; returns the annotation count.
    `concepts`: the run's concepts, its categories (see `categories`); none, one "object".

    The image list is small and written first; the annotations are streamed, one result file read
    at a time, so the run's masks are never all in memory. Annotation ids are 1-based in image
    order. Raises OSError or ValueError when a result file cannot be read, or holds a record of a
    concept the run did not ask for.
    """
    listed = categories(concepts)
    ids: dict[str, int] = {}
    for category in listed if concepts else []:
        ids.setdefault(category["name"], category["id"])  # a phrase asked twice: its records are the first's
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
                "category_id": _category_id(mask, ids),
                "segmentation": mask["segmentation"],
                "area": mask["area"],
                "bbox": mask["bbox"],
                "iscrowd": 0,
                "score": mask[score_key(mask)],
            }
            stream.write((",\n" if count > 1 else "") + json.dumps(annotation))
    stream.write('\n],\n"categories": ' + json.dumps(listed) + "}\n")
    return count
