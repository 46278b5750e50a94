"""Property-based: random and mutated bytes through the request parser and image decoder give
an RGB image or one of the documented errors, never an unhandled exception."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import data

from harness.files import encode, tiff
from sam_fast_serve.common.errors import ServiceError
from sam_fast_serve.server.imaging import decode_image
from sam_fast_serve.server.payload import parse_request

SEEDS = [
    encode(data.chelsea()[:64, :64], fmt, **params)
    for fmt, params in (("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {}), ("TIFF", {}), ("BMP", {}), ("GIF", {}))
]
_GRAY = data.chelsea()[:48, :48, 1]
# Scientific TIFFs as tifffile writes them: their headers and codecs are fuzzed too.
SEEDS += [
    tiff(_GRAY.astype(np.uint16) * 16, compression="lzw"),
    tiff(_GRAY.astype(np.float32) / 255, compression="zlib"),
    tiff(np.stack([_GRAY] * 5), photometric="minisblack", planarconfig="separate", compression="packbits"),
    tiff(np.stack([_GRAY] * 3), photometric="minisblack"),
]
DOCUMENTED = {400, 413, 415}


def check_decodes_or_refuses(body: bytes) -> None:
    try:
        image = decode_image(body, max_pixels=4_000_000)
    except ServiceError as error:
        assert error.status in DOCUMENTED and error.message
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@st.composite
def mutated(draw):
    body = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, max(0, len(body) - 1)))
        if action == "flip" and body:
            body[position] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del body[position:]
        elif action == "insert":
            body[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif body:
            del body[position : position + draw(st.integers(1, 64))]
    return bytes(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images(body):
    check_decodes_or_refuses(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes(body):
    check_decodes_or_refuses(body)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=512), st.text(max_size=512)), st.sampled_from(["body", "data", "image", "x"]))
def test_random_request_fields(value, name):
    try:
        request = parse_request({name: value})
    except ServiceError as error:
        assert error.status == 400
        return
    check_decodes_or_refuses(request.image)
