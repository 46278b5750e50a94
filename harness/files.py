"""Test inputs: image files in any format, files that claim sizes they do not have, a hostile pickle."""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any

import numpy as np
import tifffile
from PIL import Image


class RunsCommand:
    """Pickles to a call of os.system: a hostile payload for decoders to refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb when that is huge)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + pixels + _png_chunk(b"IEND", b"")


def tiff(samples: np.ndarray, **options: Any) -> bytes:
    """TIFF file bytes of `samples`, written by tifffile with `options` (photometric, compression, ...)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, **options)
    return buffer.getvalue()


def tiff_claiming(width: int, height: int) -> bytes:
    """A small TIFF whose first page's header claims width x height (tifffile writes both as LONG)."""
    data = bytearray(tiff(np.zeros((4, 4), np.uint8)))
    for tag, value in ((256, width), (257, height)):
        at = data.index(struct.pack("<HHI", tag, 4, 1)) + 8
        data[at : at + 4] = struct.pack("<I", value)
    return bytes(data)


def encode(rgb_or_pil, fmt: str = "PNG", **params) -> bytes:
    """Image file bytes of an RGB array (or PIL image) in `fmt`."""
    image = rgb_or_pil if isinstance(rgb_or_pil, Image.Image) else Image.fromarray(rgb_or_pil)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()
