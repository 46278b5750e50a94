"""The images of a run and what is asked of each: files, folders and globs of the command line,
or the lines of a prompt file; the names their results take, and the names two would share.

A prompt file holds one JSON object a line, one line per image:

    {"file": "cells/a.tif", "points": [[120, 80], [40, 60]], "labels": [1, 0], "boxes": [[10, 10, 200, 150]]}

"file" is a path, relative to the prompt file's folder unless absolute; "points", "labels" and
"boxes" are the request's prompt fields (the server's rules, see client/fields.py). Blank lines
are skipped.
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sam_fast_serve.client.fields import checked_prompts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
RESULT_SUFFIX, OVERLAY_SUFFIX = ".json", ".overlay.png"
PROMPT_FILE_KEYS = ("file", "points", "labels", "boxes")


@dataclass(frozen=True)
class Prompts:
    """The point and box prompts of an image, in its pixels; none: automatic masks."""

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.points or self.boxes)

    def fields(self) -> dict[str, Any]:
        """The request's prompt fields, those without a value left out."""
        named = {"points": self.points, "labels": self.labels, "boxes": self.boxes}
        return {name: value for name, value in named.items() if value}


@dataclass(frozen=True)
class InputImage:
    """An image to segment: its id (1-based, in input order), its file, its name relative to the
    argument it came from (which names its result files), and its prompts."""

    id: int
    path: Path
    name: PurePosixPath
    prompts: Prompts = Prompts()

    def output(self, out: Path, suffix: str) -> Path:
        """OUT/<name with `suffix` for its suffix>."""
        return out.joinpath(*self.name.with_suffix(suffix).parts)

    def result(self, out: Path) -> Path:
        return self.output(out, RESULT_SUFFIX)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _images_under(folder: Path, skip: Path) -> list[Path]:
    """The image files under `folder`, relative to it, sorted; hidden files and folders and the
    resolved folder `skip` (the output, which holds overlay PNGs) are left out."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [f for f in folders if not f.startswith(".") and (Path(root) / f).resolve() != skip]
        found += [(Path(root) / f).relative_to(folder) for f in files if not f.startswith(".") and _is_image(f)]
    return sorted(found)


def find_images(
    arguments: Sequence[str], out: Path, prompts: Prompts = Prompts()
) -> tuple[list[InputImage], list[str]]:
    """The images `arguments` name, in argument order, each folder and glob sorted, each file once
    per name, each with `prompts`; and an error message for each folder or glob that holds no image.

    A folder gives its image files (see `_images_under`) named by their path relative to it; a
    glob its image files outside `out`, named by file name; any other argument is one file named
    by its file name, taken even when it is missing: its read fails as that image's failure.
    """
    found: dict[tuple[Path, PurePosixPath], Path] = {}
    errors = []
    skip = out.resolve()
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            matches = [(path / rel, PurePosixPath(rel.as_posix())) for rel in _images_under(path, skip)]
        elif path.exists() or not any(c in argument for c in "*?["):
            matches = [(path, PurePosixPath(path.name))]
        else:
            files = sorted(map(Path, glob.glob(argument, recursive=True)))
            matches = [
                (f, PurePosixPath(f.name))
                for f in files
                if _is_image(f.name) and f.is_file() and not f.resolve().is_relative_to(skip)
            ]
        if not matches:
            errors.append(f"{argument}: no image ({' '.join(IMAGE_SUFFIXES)}) there")
        for file, name in matches:
            found.setdefault((file.resolve(), name), file)
    images = [InputImage(i, file, name, prompts) for i, ((_, name), file) in enumerate(found.items(), 1)]
    return images, errors


def _prompt_line(text: str, folder: Path) -> tuple[Path, PurePosixPath, Prompts]:
    """One line of a prompt file: the image's path and name, and its prompts; ValueError saying
    what is wrong."""
    try:
        entry = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
        raise ValueError('each line is a JSON object with a "file" path and its prompts')
    unknown = sorted(set(entry) - set(PROMPT_FILE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(PROMPT_FILE_KEYS)}")
    fields = checked_prompts(entry.get("points"), entry.get("labels"), entry.get("boxes"))
    written = Path(entry["file"])
    relative = PurePosixPath(Path(os.path.normpath(written)).as_posix())
    name = relative if not (written.is_absolute() or relative.parts[:1] == ("..",)) else PurePosixPath(written.name)
    if not name.name:
        raise ValueError(f'"file" {entry["file"]!r} names no file')
    points = fields.get("points", [])
    labels = fields.get("labels", [1] * len(points))
    return folder / written, name, Prompts(points, labels, fields.get("boxes", []))


def read_prompt_file(path: Path) -> list[InputImage]:
    """The images of the prompt file at `path` (see the module's docstring), in line order, each
    named by its path relative to the file's folder (its file name when outside it).

    Raises OSError when the file cannot be read, ValueError naming the line and what is wrong with
    it (not JSON, no "file", an unknown key, prompts the server would refuse) or an empty file.
    """
    images: list[InputImage] = []
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                file, name, prompts = _prompt_line(text, path.parent)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            images.append(InputImage(len(images) + 1, file, name, prompts))
    if not images:
        raise ValueError(f"{path}: no line names an image")
    return images


def clashes(images: Sequence[InputImage], out: Path, suffixes: Sequence[str], reports: Sequence[Path]) -> list[str]:
    """One message for each file that two images (each writing OUT/<name><suffix> for each of
    `suffixes`), or an image and one of `reports` (the COCO file, the failures report), would both write."""
    by_path: dict[Path, list[str]] = defaultdict(list)
    base = out.resolve()
    for image in images:
        for suffix in suffixes:
            by_path[image.output(base, suffix)].append(str(image.path))
    for report in reports:
        by_path[report.resolve()].append(f"the report {report}")
    return [f"{path}: {', '.join(writers)}" for path, writers in by_path.items() if len(writers) > 1]
