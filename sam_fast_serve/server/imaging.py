"""Image bytes in, an 8-bit RGB array out, or a clear error.

The header is read first so an image over the pixel limit or a decompression bomb is refused before
its pixels are allocated. TIFF files are read by tifffile (tiff.py: any sample type, page and channel
count); the other formats by OpenCV (PIL reads their header), applying the EXIF orientation. The
samples then become the 8-bit RGB that SAM expects: the chosen channels, mapped by `intensity`.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image

from sam_fast_serve.common.errors import (
    BadRequest,
    InvalidOption,
    PayloadTooLarge,
    UnsupportedMediaType,
    check_image_size,
)
from sam_fast_serve.common.intensity import rgb_for_sam
from sam_fast_serve.common.options import ImageSettings
from sam_fast_serve.common.tiff import TIFF_MAGIC, read_tiff

# Magic numbers of the formats we decode; anything else is a 415 before any decoder sees it.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    *((magic, "TIFF") for magic in TIFF_MAGIC),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
ACCEPTED_FORMATS = "JPEG, PNG, WebP, TIFF, BMP, GIF"
# A request whose body or image field is there with nothing in it: an empty file was sent.
EMPTY_IMAGE = "the image is empty (0 bytes)"


def sniff_format(data: bytes) -> str:
    """The image format named by the leading bytes, or UnsupportedMediaType."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    raise UnsupportedMediaType(f"the request body is not an image in a supported format; accepted: {ACCEPTED_FORMATS}")


def read_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header; refuses empty, oversized and bomb images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types for a broken header
        raise BadRequest(f"the image header cannot be read ({exc}); the file is corrupt") from exc
    check_image_size(width, height, max_pixels)
    return width, height


def _check_complete(data: bytes, fmt: str) -> None:
    # libjpeg fills a truncated JPEG with grey and only warns, so OpenCV returns an image for it;
    # an end-of-image marker near the end is the cheap proof the upload is whole.
    tail = data[-4096:].rstrip(b"\x00")
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise BadRequest("the JPEG is truncated (no end-of-image marker); upload the whole file")
    if fmt == "PNG" and b"IEND" not in tail[-16:]:
        raise BadRequest("the PNG is truncated (no IEND chunk); upload the whole file")


def _decode_other(data: bytes, fmt: str, settings: ImageSettings, max_pixels: int) -> np.ndarray:
    """A single-page image (not TIFF) as RGB samples (H, W, 3) of its own depth."""
    if settings.page != 0:
        raise InvalidOption(f"page {settings.page} does not exist: a {fmt} image has 1 page, page 0")
    read_size(data, max_pixels)
    _check_complete(data, fmt)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.size == 0:
        raise BadRequest(f"the {fmt} image is corrupt and cannot be decoded")
    return bgr[:, :, ::-1]


def decode_image(data: bytes, max_pixels: int, settings: ImageSettings | None = None) -> np.ndarray:
    """Decode image file bytes to the RGB array SAM sees.

    Returns an (H, W, 3) uint8 array in RGB order (EXIF orientation applied, except in TIFF files):
    the page and channels `settings` choose, mapped to 8 bits by its `intensity`. Raises BadRequest
    (empty, corrupt or truncated), UnsupportedMediaType (not a supported format, sample type or
    layout), PayloadTooLarge (over `max_pixels`, too many pages, or a decompression bomb) or
    InvalidOption (no such page or channel).
    """
    settings = settings or ImageSettings()
    if not data:
        raise BadRequest(EMPTY_IMAGE)
    fmt = sniff_format(data)
    if fmt == "TIFF":
        samples = read_tiff(data, settings.page, max_pixels)
    else:
        samples = _decode_other(data, fmt, settings, max_pixels)
    return rgb_for_sam(samples, settings.channels, settings.intensity, settings.percentiles)
