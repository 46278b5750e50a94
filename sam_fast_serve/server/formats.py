"""The answer formats: one table from the media type a request's Accept header names to how its
answer is written, for an automatic or a concept answer (a list of mask records), a prompted one
({"image_id", "prompts": [{"masks": [...]}, ...]}), and a video answer (a record a frame, a line each).

    pickle  text/plain (the default)  the records, pickled, zlib-compressed, base64 (common.wire)
    json    application/json          the same records as JSON
    png     image/png                 automatic and concepts: a uint16 instance label image
                                      (common.labels: label i + 1 is record i, whose `concept`
                                      the records say); prompted: the mask (8-bit, 0 or 255) or,
                                      with the request option output "cutout", the object cut out
                                      as RGBA

The text formats write a video answer as lines, one a frame record (pickled or JSON); PNG writes
none (the client makes the label stack). A PNG shows one mask per prompt, the best one (highest
predicted IoU, the first of equal ones: with multimask the pick of its three), and the union of
those when there are several prompts (boxes).
docs/formats.md describes the table; a test holds it to this one.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_fast_serve.common.errors import InvalidOption, NotAcceptable, ResponseTooLarge
from sam_fast_serve.common.labels import MAX_LABELS, coco_rle, encode_labels, label_image
from sam_fast_serve.common.wire import (
    DEFAULT_OUTPUT,
    JSON_MEDIA_TYPE,
    OUTPUT_OPTION,
    OUTPUTS,
    PNG_MEDIA_TYPE,
    check_output,
    encode_json,
    encode_pickled,
)

Body = str | bytes  # str for the text formats (ASCII), bytes for pictures


@dataclass(frozen=True)
class AnswerFormat:
    """One answer format. `automatic` writes an automatic or a concept answer (its records, the
    image's (H, W)); `prompted` a prompted answer (its payload, the decoded input image or None for a request
    by image_id, the request's `output`). `outputs`: the `output` values a prompted answer takes, ()
    when the option does not apply. `records`: whether the answer carries the mask records (scores,
    boxes, low-res logits) rather than a picture of the masks. `line`: one record of a video answer
    (common.tracks) as a line of text, None when the format writes no video answers."""

    name: str
    media_type: str
    content_type: str
    automatic: Callable[[list[dict[str, Any]], tuple[int, int]], Body]
    prompted: Callable[[dict[str, Any], np.ndarray | None, str], Body]
    outputs: tuple[str, ...] = ()
    records: bool = True
    line: Callable[[Any], str] | None = None


def _text_format(name: str, media_type: str, content_type: str, encode: Callable[[Any], str]) -> AnswerFormat:
    """A format that sends the answer's payload itself, automatic or prompted, as `encode` writes it."""
    return AnswerFormat(
        name,
        media_type,
        content_type,
        automatic=lambda records, size: encode(records),
        prompted=lambda payload, image, output: encode(payload),
        line=lambda record: encode(record) + "\n",
    )


def label_png(records: list[dict[str, Any]], size: tuple[int, int]) -> bytes:
    """An automatic or concept answer as a 16-bit PNG of `size` (H, W): 0 background, mask i (answer
    order) label i + 1, smaller masks on top of larger ones. Raises ResponseTooLarge past 65,535 masks."""
    if len(records) > MAX_LABELS:
        raise ResponseTooLarge(
            f"the answer has {len(records):,} masks, more than a 16-bit label image holds ({MAX_LABELS:,}): ask for "
            "fewer masks (a higher pred_iou_thresh or stability_score_thresh, fewer points_per_side)"
        )
    return encode_labels(label_image(records, size), "png")


def best_masks(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each prompt's best mask record: the highest predicted IoU, the first of equal ones."""
    return [max(prompt["masks"], key=lambda mask: mask["predicted_iou"]) for prompt in payload["prompts"]]


def prompted_mask(payload: Mapping[str, Any]) -> np.ndarray:
    """(H, W) bool: the union of each prompt's best mask."""
    rles = [coco_rle(mask) for mask in best_masks(payload)]
    return mask_utils.decode(mask_utils.merge(rles, intersect=False)).astype(bool)


def prompted_png(payload: dict[str, Any], image: np.ndarray | None, output: str) -> bytes:
    """A prompted answer as a PNG: the mask of `prompted_mask` as 8-bit gray (0 or 255), or with
    output "cutout" as the alpha of `image`'s RGB (RGBA)."""
    alpha = prompted_mask(payload).astype(np.uint8) * 255
    if output == "cutout":
        assert image is not None and image.shape[:2] == alpha.shape  # resolve_output refuses a cutout by image_id
        pixels = np.dstack([image, alpha])
    else:
        pixels = alpha
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, format="PNG")
    return stream.getvalue()


# Media type -> format, in order of preference: the first is the default, and wins a tie (`*/*`).
FORMATS: dict[str, AnswerFormat] = {
    answer.media_type: answer
    for answer in (
        _text_format("pickle", "text/plain", "text/plain; charset=us-ascii", encode_pickled),
        _text_format("json", JSON_MEDIA_TYPE, JSON_MEDIA_TYPE, encode_json),
        AnswerFormat("png", PNG_MEDIA_TYPE, PNG_MEDIA_TYPE, label_png, prompted_png, outputs=OUTPUTS, records=False),
    )
}
DEFAULT_FORMAT = next(iter(FORMATS.values()))


def _media_ranges(accept: str) -> list[tuple[str, str, float]]:
    """An Accept header's media ranges as (type, subtype, q), lower case; a range without a
    subtype or with a q that is not a number in [0, 1] is left out (`*` alone is `*/*`)."""
    ranges = []
    for item in accept.split(","):
        media, *parameters = item.split(";")
        kind, _, subtype = ("*/*" if media.strip() == "*" else media.strip().lower()).partition("/")
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        if kind and subtype and 0.0 <= quality <= 1.0:
            ranges.append((kind, subtype, quality))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, str, float]]) -> float:
    """The q that the most specific of `ranges` matching `media_type` gives it (the highest of
    equally specific ones); 0 when none matches."""
    kind, _, subtype = media_type.partition("/")
    best = (-1, 0.0)
    for range_kind, range_subtype, quality in ranges:
        if range_kind == kind and range_subtype == subtype:
            best = max(best, (2, quality))
        elif range_kind == kind and range_subtype == "*":
            best = max(best, (1, quality))
        elif range_kind == "*" and range_subtype == "*":
            best = max(best, (0, quality))
    return best[1]


def _header(headers: Mapping[str, Any], name: str) -> str:
    """A request header's value ("" when absent); names compared case-insensitively."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value if isinstance(value, str) else ""
    return ""


def choose_format(headers: Mapping[str, Any]) -> AnswerFormat:
    """The format a request's Accept header asks for: the one it gives the highest q, the first of
    the table among equals; the default without the header. Raises NotAcceptable (406) when the
    header accepts none of them."""
    accept = _header(headers, "accept")
    if not accept.strip():
        return DEFAULT_FORMAT
    ranges = _media_ranges(accept)
    answer = max(FORMATS.values(), key=lambda candidate: _quality(candidate.media_type, ranges))
    if _quality(answer.media_type, ranges) <= 0:
        offered = ", ".join(f"{media_type} ({known.name})" for media_type, known in FORMATS.items())
        raise NotAcceptable(
            f"cannot answer as {accept!r} (the request's Accept header); the answer formats are {offered}, "
            f"and {DEFAULT_FORMAT.media_type} without an Accept header"
        )
    return answer


def resolve_output(
    answer: AnswerFormat, requested: Any, *, prompted: bool, image_sent: bool, return_logits: bool
) -> str:
    """What a request's answer shows: the request's `output` (`requested`; None when not given)
    checked against its format `answer` and the request (prompted or not, the image sent or named
    by image_id, low-res logits asked for), else DEFAULT_OUTPUT.

    Raises InvalidOption (422) saying why the value or the pair does not apply.
    """
    pictures = ", ".join(media_type for media_type, candidate in FORMATS.items() if candidate.outputs)
    if requested is not None:
        problem = check_output(requested)
        if problem:
            raise InvalidOption(f"request option {OUTPUT_OPTION!r} {problem}")
        if requested not in answer.outputs:
            raise InvalidOption(
                f"request option {OUTPUT_OPTION!r} applies to answers as {pictures} (the Accept header), "
                f"not to {answer.media_type}"
            )
        if not prompted:
            raise InvalidOption(
                f"request option {OUTPUT_OPTION!r} applies to prompted requests (points, boxes or a mask_input); "
                f"an automatic or concept answer as {answer.media_type} is the instance label image"
            )
    output = DEFAULT_OUTPUT if requested is None else requested
    if output == "cutout" and not image_sent:
        raise InvalidOption(
            f"{OUTPUT_OPTION!r} 'cutout' is made of the image's pixels: send the image itself, not an 'image_id'"
        )
    if prompted and return_logits and not answer.records:
        with_records = ", ".join(media_type for media_type, candidate in FORMATS.items() if candidate.records)
        raise InvalidOption(
            f"'return_logits' needs an answer that carries the mask records ({with_records}); "
            f"an answer as {answer.media_type} is a picture of the mask"
        )
    return output
