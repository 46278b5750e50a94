"""Request decoding: every input form and image mode becomes the same 8-bit RGB pixels."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from harness.files import encode, png_claiming
from sam_fast_serve.common.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from sam_fast_serve.common.intensity import to_uint8
from sam_fast_serve.server.config import ImageSettings
from sam_fast_serve.server.imaging import decode_image
from sam_fast_serve.server.payload import parse_request

LIMIT = 50_000_000


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "WEBP", "JPEG"])
def test_formats_decode_to_rgb(astronaut, fmt):
    params = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    decoded = decode_image(encode(astronaut, fmt, **params), LIMIT)
    assert decoded.shape == astronaut.shape and decoded.dtype == np.uint8
    tolerance = 3.0 if fmt == "JPEG" else 0.0
    assert np.abs(decoded.astype(int) - astronaut).mean() <= tolerance


def test_channel_order_is_rgb():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert decode_image(encode(red), LIMIT)[0, 0].tolist() == [255, 0, 0]


def test_grayscale_rgba_palette_become_rgb(astronaut):
    gray = decode_image(encode(Image.fromarray(astronaut).convert("L")), LIMIT)
    assert gray.shape == astronaut.shape and (gray[..., 0] == gray[..., 2]).all()
    rgba = decode_image(encode(Image.fromarray(astronaut).convert("RGBA")), LIMIT)
    assert np.array_equal(rgba, astronaut)
    palette_image = Image.fromarray(astronaut).convert("P")
    palette = decode_image(encode(palette_image), LIMIT)
    assert np.array_equal(palette, np.asarray(palette_image.convert("RGB")))


def test_16_bit_becomes_8_bit(astronaut):
    """`linear` keeps the full 16-bit range (65535 -> 255); the default `auto` stretches by percentile."""
    wide = astronaut.astype(np.uint16) * 257
    ok, png = cv2.imencode(".png", cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
    linear = ImageSettings(intensity="linear")
    assert np.array_equal(decode_image(png.tobytes(), LIMIT, linear), astronaut)
    assert np.array_equal(decode_image(png.tobytes(), LIMIT), to_uint8(wide, "percentile"))
    ok, tiff = cv2.imencode(".tif", wide[..., 1])
    decoded = decode_image(tiff.tobytes(), LIMIT, linear)
    assert np.array_equal(decoded[..., 0], astronaut[..., 1])


def test_exif_orientation_is_applied(astronaut):
    tall = astronaut[:, :300]  # 512 rows x 300 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display 90 degrees clockwise
    decoded = decode_image(encode(tall, "JPEG", quality=95, exif=exif.tobytes()), LIMIT)
    assert decoded.shape == (300, 512, 3)
    expected = np.rot90(tall, k=-1)
    assert np.abs(decoded.astype(int) - expected).mean() < 4


@pytest.mark.parametrize(
    "body, error, status",
    [
        (b"", BadRequest, 400),
        (b"hello, this is text and not an image", UnsupportedMediaType, 415),
        (b"%PDF-1.7 not an image", UnsupportedMediaType, 415),
        (png_claiming(40_000, 40_000), PayloadTooLarge, 413),
        (png_claiming(0, 10), BadRequest, 400),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, BadRequest, 400),
    ],
)
def test_bad_bytes_get_their_error(body, error, status):
    with pytest.raises(error) as caught:
        decode_image(body, LIMIT)
    assert caught.value.status == status and caught.value.message


def test_over_the_pixel_limit_is_refused_from_the_header(astronaut):
    with pytest.raises(PayloadTooLarge, match="512x512"):
        decode_image(encode(astronaut), 512 * 511)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_refused(astronaut, fmt):
    whole = encode(astronaut, fmt)
    with pytest.raises(BadRequest, match="truncated|corrupt"):
        decode_image(whole[: len(whole) * 2 // 3], LIMIT)


def test_request_forms_all_give_the_same_image(chelsea):
    png = encode(chelsea)
    b64 = base64.b64encode(png).decode()
    forms = [
        {"body": bytearray(png)},  # raw body (curl -T / --data-binary)
        {"data": bytearray(png)},  # multipart field "data"
        {"upload": bytearray(png)},  # multipart with any single field name
        {"body": b64},  # text/plain base64
        {"body": bytearray(b64.encode())},  # base64 sent as octet-stream
        {"body": "data:image/png;base64," + b64},  # data URL
        {"body": {"image": b64}},  # application/json (TorchServe parses it)
        {"body": bytearray(json.dumps({"image": b64}).encode())},  # JSON without its content type
    ]
    for fields in forms:
        request = parse_request(fields)
        assert request.image == png, fields.keys()
        assert request.options == {}


def test_options_come_from_json_and_form_fields(chelsea):
    png = encode(chelsea)
    b64 = base64.b64encode(png).decode()
    assert parse_request({"body": {"image": b64, "points_per_side": 8}}).options == {"points_per_side": 8}
    form = parse_request({"image": bytearray(png), "pred_iou_thresh": bytearray(b"0.5")})
    assert form.image == png and form.options == {"pred_iou_thresh": 0.5}


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, "no image"),
        ({"body": bytearray()}, r"^the image is empty \(0 bytes\)$"),  # an empty file as the body
        ({"image": b"", "points_per_side": b"8"}, r"^the image is empty \(0 bytes\)$"),  # or as a multipart field
        ({"body": {"picture": "abc"}}, '"image"'),
        ({"body": {"image": "%%%not base64%%%"}}, "base64"),
        ({"body": "{not json"}, "JSON"),
        ({"body": b"{\x80"}, "JSON"),  # not UTF-8 (found by hypothesis)
        ({"body": b'{"image": ' + b"[" * 100_000}, "JSON"),  # nested past the recursion limit
        ({"body": ["a", "list"]}, "must be an object"),
    ],
)
def test_unusable_requests_are_bad_requests(fields, match):
    with pytest.raises(ServiceError, match=match) as caught:
        parse_request(fields)
    assert caught.value.status == 400
