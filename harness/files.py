"""Test inputs: image files in any format, files that claim sizes they do not have, a hostile pickle."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import cv2
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


CLIP_FRAMES = 40


def pan_clip(photo: np.ndarray, folder: Path, count: int = CLIP_FRAMES) -> Path:
    """A camera panning over `photo`: `count` JPEG files 0.jpg, 1.jpg, ... of 160 x 120 in `folder`
    (what SAM2VideoPredictor.init_state reads)."""
    for i in range(count):
        frame = photo[100 + i : 220 + i, 150 + 2 * i : 310 + 2 * i]
        Image.fromarray(np.ascontiguousarray(frame)).save(folder / f"{i}.jpg", quality=95)
    return folder


def clip_pixels(folder: Path, count: int = CLIP_FRAMES) -> np.ndarray:
    """The first `count` frames of a `pan_clip` as decoded: (count, H, W, 3) RGB uint8."""
    return np.stack([np.array(Image.open(folder / f"{i}.jpg").convert("RGB")) for i in range(count)])


def video_file(frames: np.ndarray, suffix: str, fourcc: str, fps: int = 10) -> bytes:
    """The file bytes of RGB `frames` (N, H, W, 3) written by OpenCV as a `suffix` video of codec `fourcc`."""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / f"clip{suffix}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*fourcc), fps, (frames.shape[2], frames.shape[1]))
        assert writer.isOpened(), f"OpenCV cannot write {fourcc} {suffix}"
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
        writer.release()
        return Path(path).read_bytes()


def video_frames(data: bytes, suffix: str) -> np.ndarray:
    """Every frame of a video file as OpenCV's FFmpeg decodes it: (N, H, W, 3) RGB uint8."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip{suffix}"
        path.write_bytes(data)
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        frames = []
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(bgr[:, :, ::-1])
        capture.release()
    return np.stack(frames)
