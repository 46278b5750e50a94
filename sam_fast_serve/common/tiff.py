"""TIFF files to samples, read with tifffile (the reader of the microscopy world): 8/12/16/32-bit
integer and float samples, any number of channels, any page, the compressions tifffile and
imagecodecs decode. The page's header is checked (pixel count, bytes, layout) before its pixels are.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tifffile

from sam_fast_serve.common.errors import (
    BadRequest,
    InvalidOption,
    PayloadTooLarge,
    UnsupportedMediaType,
    check_image_size,
)
from sam_fast_serve.common.intensity import linear_16_to_8

# Classic TIFF and BigTIFF, little- and big-endian.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# A file with more pages than this is refused before any page is read (a page is one IFD).
MAX_PAGES = 10_000
# Decoded samples may take this many bytes per pixel at most (4 float32 channels), so a page's
# memory stays within a bound of max_image_pixels whatever its channel count and sample type.
MAX_SAMPLE_BYTES_PER_PIXEL = 16


def is_tiff(data: bytes) -> bool:
    return data.startswith(TIFF_MAGIC)


def _page_count(tif: tifffile.TiffFile) -> int:
    count = len(tif.pages)
    if count > MAX_PAGES:
        raise PayloadTooLarge(f"the TIFF has {count} pages; at most {MAX_PAGES} are accepted")
    return count


def _checked_page(page: tifffile.TiffPage, max_pixels: int, limit_key: str) -> None:
    """Refuse a page whose header says it is too large or laid out in a way we do not read."""
    height, width, samples = page.imagelength, page.imagewidth, page.samplesperpixel
    if not all(type(value) is int for value in (height, width, samples, page.imagedepth)):
        raise BadRequest("the TIFF page's size tags are malformed; the file is corrupt")
    check_image_size(width, height, max_pixels, limit_key)
    dtype = page.dtype
    if dtype is None or dtype.kind not in "uif":
        raise UnsupportedMediaType(
            f"TIFF samples of format {page.sampleformat!r} and {page.bitspersample} bits are not supported; "
            "use integer or float samples"
        )
    if height * width * samples * dtype.itemsize > max_pixels * MAX_SAMPLE_BYTES_PER_PIXEL:
        raise PayloadTooLarge(
            f"the TIFF page holds {samples} channels of {dtype} at {width}x{height}: more sample data "
            f"than {MAX_SAMPLE_BYTES_PER_PIXEL} bytes per pixel of the {max_pixels}-pixel limit"
        )
    if page.imagedepth > 1 or page.axes not in ("YX", "YXS", "SYX"):
        raise UnsupportedMediaType(
            f"the TIFF page is laid out as {page.axes!r} (shape {page.shape}); supported: one plane of "
            "Y x X pixels with any number of channels (one page per plane)"
        )


@contextlib.contextmanager
def tiff_pages(data: bytes) -> Iterator[Sequence[Any]]:
    """The pages of a TIFF file (at least one, at most MAX_PAGES), readable while the context lasts.

    Raises BadRequest (corrupt, no page) or PayloadTooLarge (too many pages).
    """
    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception as exc:  # tifffile raises many types for a broken header
        raise BadRequest(f"the TIFF header cannot be read ({exc}); the file is corrupt") from exc
    with tif:
        try:
            pages = _page_count(tif)
        except PayloadTooLarge:
            raise
        except Exception as exc:
            raise BadRequest(f"the TIFF's page directory cannot be read ({exc}); the file is corrupt") from exc
        if pages == 0:
            raise BadRequest("the TIFF has no image page; the file is corrupt")
        yield tif.pages


def tiff_page(
    pages: Sequence[Any], index: int, max_pixels: int, limit_key: str = "max_image_pixels"
) -> tifffile.TiffPage:
    """Page `index` of `pages`, its header checked (see `read_tiff`; `max_pixels` is the handler
    key `limit_key`) before any pixel is read."""
    if index >= len(pages):
        raise InvalidOption(f"page {index} does not exist: the TIFF has {len(pages)} page(s), 0 to {len(pages) - 1}")
    try:
        page = pages[index]
    except Exception as exc:
        raise BadRequest(f"the TIFF's page directory cannot be read ({exc}); the file is corrupt") from exc
    if not isinstance(page, tifffile.TiffPage):
        raise UnsupportedMediaType("the TIFF page is a frame of another page; send it as a file of its own")
    _checked_page(page, max_pixels, limit_key)
    return page


def page_samples(page: tifffile.TiffPage) -> np.ndarray:
    """The samples of a checked page (`tiff_page`) as an (H, W, C) array of its own dtype."""
    try:
        samples = page.asarray()
    except Exception as exc:
        raise BadRequest(f"the TIFF page cannot be decoded ({exc}); the file is corrupt") from exc
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
        # Palette entries are 16-bit over the full range: as 8-bit they are the colours meant.
        return linear_16_to_8(np.moveaxis(page.colormap, 0, -1)[samples])
    if page.axes == "YX":
        return samples[:, :, None]
    if page.axes == "SYX":
        return np.moveaxis(samples, 0, -1)
    return samples


def read_tiff(data: bytes, page_index: int, max_pixels: int) -> np.ndarray:
    """The samples of page `page_index` of a TIFF file as an (H, W, C) array of its own dtype.

    Raises BadRequest (corrupt), InvalidOption (no such page), PayloadTooLarge (too many pages,
    pixels or bytes) or UnsupportedMediaType (a sample type or layout we do not read).
    """
    with tiff_pages(data) as pages:
        return page_samples(tiff_page(pages, page_index, max_pixels))
