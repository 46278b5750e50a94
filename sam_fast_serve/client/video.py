"""Videos and time-lapse stacks through a SAM 2 / 2.1 server (common.tracks): each file tracked by
one request, its answer read a line at a time as the server streams it, and written as

    OUT/NAME.masklets.json  {"file", "objects": [ids], "frames": [the frame records]}
    OUT/NAME.labels.tif     a uint16 label stack: a page a frame tracked, each object's pixels its
                            id, 0 elsewhere (what Fiji and napari open as a label stack)
    OUT/NAME.overlay.mp4    with --overlay-video: the frames tracked, in order, each object's
                            mask blended in its own colour (OpenCV reads and writes the video)

each file complete or not at all. A file that fails is one failure; the run goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sam_fast_serve.client.http import SamClient
from sam_fast_serve.client.overlay import ANY_SIZE
from sam_fast_serve.client.results import replacing
from sam_fast_serve.common.intensity import rgb_for_sam
from sam_fast_serve.common.options import IMAGE_RULES, ImageSettings
from sam_fast_serve.common.tiff import is_tiff, page_samples, tiff_page, tiff_pages

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
MASKLETS, LABELS, OVERLAY = ".masklets.json", ".labels.tif", ".overlay.mp4"
OVERLAY_FPS = 10  # a TIFF stack's, and a video's whose file gives none
OPENCV_NEEDED = "--overlay-video needs OpenCV, which the client install leaves out: pip install opencv-python-headless"
# A label stack is uint16 with 0 for background: the ids that fit.
MAX_LABEL = 65535


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def label_problem(prompts: Sequence[dict[str, Any]]) -> str | None:
    """Why the label stack cannot hold the objects of `prompts` (None when it can)."""
    bad = sorted(
        {p.get("object") for p in prompts if not (isinstance(p.get("object"), int) and 1 <= p["object"] <= MAX_LABEL)},
        key=str,
    )
    if bad:
        return f"object ids must be integers from 1 to {MAX_LABEL} (a uint16 label, 0 the background); got {bad}"
    return None


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """A prompts file: a JSON list in the server's form (common.tracks). ValueError when it is not one."""
    prompts = json.loads(path.read_text())
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, dict) for p in prompts):
        raise ValueError(f'{path}: not a JSON list of prompts like [{{"frame": 0, "object": 1, "points": [[x, y]]}}]')
    problem = label_problem(prompts)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return prompts


def label_page(record: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """A frame record's objects painted with their ids ((H, W) uint16), later objects on top."""
    page = np.zeros(size, np.uint16)
    for obj in record["objects"]:
        page[mask_utils.decode(obj["segmentation"]).astype(bool)] = obj["object"]
    return page


def track_file(
    client: SamClient,
    path: Path,
    out: Path,
    prompts: Sequence[dict[str, Any]],
    options: dict[str, Any],
    progress: Callable[[int], tqdm],
    overlay: bool = False,
) -> int:
    """Track `path` (a video file or a TIFF stack) and write its masklets and label stack in `out`,
    with a progress bar over its frames (`progress(total)`); the frames tracked. Raises a SamError
    (the server's refusal, or an error that ended the answer), OSError or ValueError: nothing is
    written then."""
    records: list[dict[str, Any]] = []
    answer = client.track(path, prompts, **options)
    with replacing(out / f"{path.stem}{LABELS}") as labels:
        header = next(answer)
        with progress(header["frames"]) as bar, tifffile.TiffWriter(labels, imagej=True) as stack:
            for record in _frames(answer):
                records.append(record)
                if record["objects"]:
                    size = tuple(record["objects"][0]["segmentation"]["size"])
                    stack.write(label_page(record, size), contiguous=True)
                bar.update(1)
    document = {"file": str(path), "objects": header["objects"], "frames": records}
    if overlay:
        image_options = {key: value for key, value in options.items() if key in IMAGE_RULES}
        write_overlay(path, records, out / f"{path.stem}{OVERLAY}", ImageSettings(**image_options))
    with replacing(out / f"{path.stem}{MASKLETS}") as masklets:
        masklets.write_text(json.dumps(document))
    return len(records)


def object_colour(obj: int) -> np.ndarray:
    """An object's colour (RGB), the same in every frame and run: hues spread by the golden ratio."""
    hue = (obj * 0.618033988749895) % 1.0
    sector, fraction = int(hue * 6), hue * 6 % 1.0
    channels = [
        (1, fraction, 0),
        (1 - fraction, 1, 0),
        (0, 1, fraction),
        (0, 1 - fraction, 1),
        (fraction, 0, 1),
        (1, 0, 1 - fraction),
    ]
    return np.array(channels[sector]) * 255


def painted(frame: np.ndarray, record: dict[str, Any], alpha: float = 0.5) -> np.ndarray:
    """An RGB frame with each object of its record blended in the object's colour."""
    out = frame.astype(np.float32)
    for obj in record["objects"]:
        inside = mask_utils.decode(obj["segmentation"]).astype(bool)
        out[inside] = (1 - alpha) * out[inside] + alpha * object_colour(obj["object"])
    return out.round().astype(np.uint8)


def source_frames(path: Path, wanted: set[int], settings: ImageSettings) -> Iterator[tuple[int, np.ndarray]]:
    """(i, frame i as RGB uint8) for the frames `wanted` of a video file (OpenCV) or a TIFF stack, in order."""
    data = path.read_bytes()
    if is_tiff(data):
        with tiff_pages(data) as pages:
            for i in sorted(wanted):
                samples = page_samples(tiff_page(pages, i, ANY_SIZE))
                yield i, rgb_for_sam(samples, settings.channels, settings.intensity, settings.percentiles)
        return
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        for i in range(max(wanted) + 1):
            ok, bgr = capture.read()
            if not ok:
                raise ValueError(f"{path}: OpenCV read {i} frames, the server {max(wanted) + 1}")
            if i in wanted:
                yield (
                    i,
                    rgb_for_sam(
                        np.ascontiguousarray(bgr[:, :, ::-1]),
                        settings.channels,
                        settings.intensity,
                        settings.percentiles,
                    ),
                )
    finally:
        capture.release()


def write_overlay(path: Path, records: Sequence[dict[str, Any]], target: Path, settings: ImageSettings) -> None:
    """The frames of `records` in frame order, their objects painted, as an MP4 at `target`."""
    import cv2

    by_frame = {record["frame"]: record for record in records}
    with replacing(target) as temp:
        # OpenCV picks the container by the file's suffix: it writes beside the temporary file.
        written = temp.with_suffix(".mp4")
        writer = None
        try:
            for i, frame in source_frames(path, set(by_frame), settings):
                if writer is None:
                    writer = cv2.VideoWriter(
                        str(written),
                        cv2.VideoWriter.fourcc(*"mp4v"),
                        OVERLAY_FPS,
                        (frame.shape[1], frame.shape[0]),
                    )
                writer.write(np.ascontiguousarray(painted(frame, by_frame[i])[:, :, ::-1]))
            if writer is not None:
                writer.release()
            written.rename(temp)
        finally:
            if writer is not None:
                writer.release()
            written.unlink(missing_ok=True)


def _frames(answer: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The frame records of an answer after its header, up to its summary."""
    for record in answer:
        if record.get("done") is True:
            return
        yield record
