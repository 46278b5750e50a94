"""The table of answer formats without a model: which format an Accept header gets, which `output`
a request may ask for, the pictures drawn from mask records, the size limit on every body, and
docs/formats.md against the table."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from harness.servers import REPO
from sam_fast_serve.common.errors import InvalidOption, NotAcceptable, ResponseTooLarge
from sam_fast_serve.common.labels import MAX_LABELS, label_image
from sam_fast_serve.common.wire import DEFAULT_OUTPUT, IMAGE_ID_HEADER, OUTPUTS
from sam_fast_serve.server.formats import (
    FORMATS,
    choose_format,
    label_png,
    prompted_png,
    resolve_output,
)
from sam_fast_serve.server.responses import payload_reply

SIZE = (40, 60)  # (H, W)


@pytest.mark.parametrize(
    ("accept", "name"),
    [
        (None, "pickle"),
        ("", "pickle"),
        ("*/*", "pickle"),
        ("*", "pickle"),
        ("text/plain", "pickle"),
        ("text/*", "pickle"),
        ("application/json", "json"),
        ("Application/JSON; charset=utf-8", "json"),
        ("image/png", "png"),
        ("image/*", "png"),
        ("image/png, application/json", "json"),  # equal q: the table's order
        ("application/json;q=0.5, image/png", "png"),
        ("image/png;q=0, */*", "pickle"),  # q=0 refuses a type that */* would cover
        ("image/*;q=0.2, image/png;q=0.9, */*;q=0.5", "png"),  # the most specific range counts
        ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", "pickle"),
        ("image/png;q=high, application/json", "json"),  # a range with a bad q is left out
    ],
)
def test_the_accept_header_picks_the_format(accept, name):
    assert choose_format({} if accept is None else {"Accept": accept}).name == name


def test_the_header_name_is_any_case_and_its_value_may_be_bytes():
    assert choose_format({"ACCEPT": b"image/png"}).name == "png"
    assert choose_format({"accept": "application/json", "Content-Type": "image/png"}).name == "json"


@pytest.mark.parametrize("accept", ["application/xml", "image/jpeg", "image/png;q=0", "nonsense"])
def test_an_accept_without_a_format_is_a_406_listing_them(accept):
    with pytest.raises(NotAcceptable) as refused:
        choose_format({"Accept": accept})
    assert refused.value.status == 406 and repr(accept) in refused.value.message
    assert all(media_type in refused.value.message for media_type in FORMATS)


@pytest.mark.parametrize(
    ("media_type", "requested", "prompted", "image_sent", "return_logits", "expected"),
    [
        ("image/png", None, True, True, False, DEFAULT_OUTPUT),
        ("image/png", "cutout", True, True, False, "cutout"),
        ("image/png", "mask", True, False, False, "mask"),
        ("image/png", None, False, True, False, DEFAULT_OUTPUT),
        ("application/json", None, True, True, True, DEFAULT_OUTPUT),
        ("image/png", "outline", True, True, False, "must be one of mask, cutout; got 'outline'"),
        ("image/png", ["mask"], True, True, False, "must be one of"),
        ("application/json", "mask", True, True, False, "applies to answers as image/png"),
        ("text/plain", "cutout", True, True, False, "not to text/plain"),
        ("image/png", "mask", False, True, False, "applies to prompted requests"),
        ("image/png", "cutout", True, False, False, "not an 'image_id'"),
        ("image/png", None, True, True, True, "'return_logits' needs an answer that carries the mask records"),
    ],
)
def test_the_output_option(media_type, requested, prompted, image_sent, return_logits, expected):
    answer_format = FORMATS[media_type]
    arguments = {"prompted": prompted, "image_sent": image_sent, "return_logits": return_logits}
    if expected in OUTPUTS:
        assert resolve_output(answer_format, requested, **arguments) == expected
    else:
        with pytest.raises(InvalidOption, match=re.escape(expected)):
            resolve_output(answer_format, requested, **arguments)


def box(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def record(mask: np.ndarray, predicted_iou: float = 0.5) -> dict:
    """A mask record as the wire carries it: COCO RLE with str counts."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return {"segmentation": segmentation, "area": int(mask.sum()), "predicted_iou": predicted_iou}


def pixels(body: bytes) -> tuple[str, np.ndarray]:
    image = Image.open(io.BytesIO(body))
    return image.mode, np.asarray(image)


def test_a_prompted_png_is_the_union_of_each_prompts_best_mask():
    first, second = box(0, 0, 10, 10), box(20, 30, 40, 60)
    payload = {
        "image_id": "0" * 32,
        "prompts": [
            {"masks": [record(box(0, 0, 40, 60), 0.2), record(first, 0.9), record(box(0, 0, 5, 5), 0.4)]},
            # equal scores: the first of them
            {"masks": [record(second, 0.7), record(box(0, 0, 40, 60), 0.7)]},
        ],
    }
    mode, mask = pixels(prompted_png(payload, None, "mask"))
    assert mode == "L" and mask.shape == SIZE
    np.testing.assert_array_equal(mask, np.where(first | second, 255, 0))
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    mode, cutout = pixels(prompted_png(payload, image, "cutout"))
    assert mode == "RGBA"
    np.testing.assert_array_equal(cutout[..., :3], image)
    np.testing.assert_array_equal(cutout[..., 3], mask)


def test_an_automatic_png_is_the_label_image_and_has_a_limit():
    records = [record(box(0, 0, 40, 60)), record(box(5, 5, 20, 20)), record(box(10, 10, 30, 50))]
    mode, labels = pixels(label_png(records, SIZE))
    assert mode == "I;16"
    np.testing.assert_array_equal(labels, label_image(records, SIZE))
    assert set(np.unique(labels)) == {1, 2, 3}
    # an answer without masks is all background, the size of the image
    assert not pixels(label_png([], SIZE))[1].any()
    with pytest.raises(ResponseTooLarge, match="65,535"):
        label_png([records[0]] * (MAX_LABELS + 1), SIZE)


def test_max_response_bytes_bounds_text_and_picture_bodies():
    for body in ("x" * 2048, b"\x89PNG" + bytes(2044)):
        with pytest.raises(ResponseTooLarge, match="max_response_bytes"):
            payload_reply(body, "image/png", "0" * 32, max_bytes=2047)
        reply = payload_reply(body, "image/png", "0" * 32, max_bytes=2048)
        assert reply.status == 200 and reply.body == body and reply.headers == {IMAGE_ID_HEADER: "0" * 32}


def test_the_formats_page_holds_the_table():
    page = (REPO / "docs" / "formats.md").read_text()
    table = re.search(r"<!-- formats-table: start -->\n(.*?)<!-- formats-table: end -->", page, re.S)
    assert table is not None
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")][:3] for line in table.group(1).splitlines()[2:]
    ]
    assert rows == [[f"`{f.name}`", f"`{f.media_type}`", f"`{f.content_type}`"] for f in FORMATS.values()]
    png_row = table.group(1).splitlines()[-1]
    assert all(f'`"output": "{output}"`' in png_row for output in OUTPUTS)
    assert f'`"output": "{DEFAULT_OUTPUT}"` (the default)' in png_row
    # The 406 the page shows is the server's.
    with pytest.raises(NotAcceptable) as refused:
        choose_format({"Accept": "application/xml"})
    (shown,) = re.findall(r"```json\n(.*?)\n```", page, re.S)
    assert json.loads(shown) == refused.value.to_body()
