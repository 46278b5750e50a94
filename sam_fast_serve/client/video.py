"""Videos and time-lapse stacks through a SAM 2 / 2.1 server (common.tracks): each file tracked by
one request, its answer read a line at a time as the server streams it, and written as

    OUT/NAME.masklets.json  {"file", "objects": [ids], "frames": [the frame records]}
    OUT/NAME.labels.tif     a uint16 label stack: a page a frame tracked, each object's pixels its
                            id, 0 elsewhere (what Fiji and napari open as a label stack)

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
from sam_fast_serve.client.results import replacing

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
MASKLETS, LABELS = ".masklets.json", ".labels.tif"
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
    with replacing(out / f"{path.stem}{MASKLETS}") as masklets:
        masklets.write_text(json.dumps(document))
    return len(records)


def _frames(answer: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The frame records of an answer after its header, up to its summary."""
    for record in answer:
        if record.get("done") is True:
            return
        yield record
