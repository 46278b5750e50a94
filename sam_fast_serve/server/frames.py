"""The frames of a video request: a video file (MP4, MOV, WebM/MKV, AVI, through OpenCV's FFmpeg)
or a multi-page TIFF (one page a frame), checked against the limits from the file's header before
any frame is decoded, then read one frame at a time as the RGB uint8 SAM sees.

`open_video` reads the header (frame count and size) and checks the limits; `Video.select` then
reads the frames to track: a TIFF's pages straight from the request's bytes, a video file's frames
decoded in order, once, into a temporary file of raw pixels (frame i is read back from it when the
tracker asks), so that memory holds one frame however long the video is.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from sam_fast_serve.common.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, check_image_size
from sam_fast_serve.common.intensity import rgb_for_sam
from sam_fast_serve.common.options import ImageSettings
from sam_fast_serve.common.tiff import is_tiff, page_samples, tiff_page, tiff_pages

VIDEO_FORMATS = "MP4, MOV, WebM/MKV, AVI or a multi-page TIFF"
FRAME_PIXELS_KEY = "max_frame_pixels"


@dataclass(frozen=True)
class VideoLimits:
    """At most `frames` frames, `frame_pixels` pixels a frame and `total_pixels` in all frames."""

    frames: int
    frame_pixels: int
    total_pixels: int

    def check_count(self, count: int, what: str) -> None:
        """PayloadTooLarge when `count` frames are more than the limit."""
        if count > self.frames:
            raise PayloadTooLarge(
                f"the {what} has {count:,} frames; at most {self.frames:,} are accepted (handler key max_video_frames)"
            )

    def check(self, count: int, width: int, height: int, what: str) -> None:
        """PayloadTooLarge naming the numbers and the handler key when a video of `count` frames of
        width x height is over a limit."""
        self.check_count(count, what)
        check_image_size(width, height, self.frame_pixels, FRAME_PIXELS_KEY)
        if count * width * height > self.total_pixels:
            raise PayloadTooLarge(
                f"the {what} holds {count:,} frames of {width}x{height}, {count * width * height:,} pixels; "
                f"at most {self.total_pixels:,} are accepted (handler key max_video_pixels)"
            )


class Frames(Protocol):
    """The frames tracked: frame i (0 to len - 1) as RGB uint8 (height, width, 3)."""

    height: int
    width: int

    def __len__(self) -> int: ...

    def __call__(self, index: int) -> np.ndarray: ...


def container(data: bytes) -> str | None:
    """The video container the leading bytes name (or "TIFF"), None for anything else."""
    if is_tiff(data):
        return "TIFF"
    if data[4:8] == b"ftyp":
        return "MP4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "AVI"
    return None


@dataclass(frozen=True)
class Video:
    """A video request's file: its frame count and size (from the header, within the limits), and
    `select`: the frames numbered by a range within count, read as the tracker asks for them
    (BadRequest when the file turns out truncated or corrupt)."""

    count: int
    width: int
    height: int
    select: Callable[[range], Frames]


def open_video(data: bytes, limits: VideoLimits, settings: ImageSettings, stack: contextlib.ExitStack) -> Video:
    """The video of a request's file bytes, open until `stack` closes.

    Raises UnsupportedMediaType (not a video or TIFF), BadRequest (empty, corrupt) or
    PayloadTooLarge (over a limit: checked from the header, before any frame is decoded).
    """
    if not data:
        raise BadRequest("the request's video is empty")
    kind = container(data)
    if kind is None:
        raise UnsupportedMediaType(f"the video is not a file in a supported format; accepted: {VIDEO_FORMATS}")
    if kind == "TIFF":
        return _tiff_video(data, limits, settings, stack)
    return _decoded_video(data, kind, limits, settings, stack)


def _tiff_video(data: bytes, limits: VideoLimits, settings: ImageSettings, stack: contextlib.ExitStack) -> Video:
    pages = stack.enter_context(tiff_pages(data))
    limits.check_count(len(pages), "TIFF")  # before every page's header is read
    headers = [tiff_page(pages, index, limits.frame_pixels, FRAME_PIXELS_KEY) for index in range(len(pages))]
    height, width = headers[0].imagelength, headers[0].imagewidth
    for index, page in enumerate(headers):
        if (page.imagelength, page.imagewidth) != (height, width):
            raise BadRequest(
                f"TIFF page {index} is {page.imagewidth}x{page.imagelength} and page 0 {width}x{height}: "
                "the frames of a time-lapse stack must all be one size"
            )
    limits.check(len(headers), width, height, "TIFF")

    def select(frames: range) -> Frames:
        return _Reader(frames, width, height, lambda i: page_samples(headers[frames[i]]), settings)

    return Video(len(headers), width, height, select)


def _decoded_video(
    data: bytes, kind: str, limits: VideoLimits, settings: ImageSettings, stack: contextlib.ExitStack
) -> Video:
    # OpenCV's FFmpeg reads files only: the upload goes to a temporary file, removed with `stack`.
    upload = stack.enter_context(tempfile.NamedTemporaryFile(suffix=f".{kind.lower()}"))
    upload.write(data)
    upload.flush()
    capture = cv2.VideoCapture(upload.name, cv2.CAP_FFMPEG)
    stack.callback(capture.release)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if not capture.isOpened() or count <= 0 or width <= 0 or height <= 0:
        raise BadRequest(f"the {kind} video cannot be opened: the file is corrupt or truncated")
    limits.check(count, width, height, f"{kind} video")
    frame_bytes = width * height * 3

    def select(frames: range) -> Frames:
        spool = stack.enter_context(tempfile.TemporaryFile())
        for index in range(frames[-1] + 1):
            ok = capture.read()[0] if index not in frames else _spool_next(capture, spool, width, height)
            if not ok:
                raise BadRequest(
                    f"the {kind} video ends after {index} of the {count} frames its header gives: "
                    "the file is truncated or corrupt"
                )
        descriptor = spool.fileno()

        def read(i: int) -> np.ndarray:
            raw = os.pread(descriptor, frame_bytes, i * frame_bytes)
            return np.frombuffer(raw, np.uint8).reshape(height, width, 3)

        return _Reader(frames, width, height, read, settings)

    return Video(count, width, height, select)


def _spool_next(capture: Any, spool: Any, width: int, height: int) -> bool:
    ok, bgr = capture.read()
    if not ok or bgr is None or bgr.shape != (height, width, 3):
        return False
    spool.write(np.ascontiguousarray(bgr[:, :, ::-1]).tobytes())
    return True


class _Reader:
    """Frames `frames` of a video: frame i's samples from `samples(i)`, made RGB uint8 by `settings`."""

    def __init__(
        self,
        frames: range,
        width: int,
        height: int,
        samples: Callable[[int], np.ndarray],
        settings: ImageSettings,
    ) -> None:
        self.frames, self.width, self.height = frames, width, height
        self._samples, self._settings = samples, settings

    def __len__(self) -> int:
        return len(self.frames)

    def __call__(self, index: int) -> np.ndarray:
        s = self._settings
        return rgb_for_sam(self._samples(index), s.channels, s.intensity, s.percentiles)
