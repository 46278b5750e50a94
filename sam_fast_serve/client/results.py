"""What a run writes for each image, and for the run: OUT/<name>.json (the decoded answer), the
overlay OUT/<name>.overlay.png, the label image OUT/<name>.labels.png|.tif, and the COCO file;
and the results an earlier run left, so a rerun sends only what is missing.

Every file is written to a temporary file and renamed, so none is ever seen half-written, after
Ctrl-C or a crash either. The .json is written last: a valid .json marks an image done.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam_fast_serve.client.coco import CocoImage, header_size, is_concept_list, mask_size, masks_of, write_coco
from sam_fast_serve.client.http import Answer
from sam_fast_serve.client.inputs import OVERLAY_SUFFIX, RESULT_SUFFIX, InputImage
from sam_fast_serve.client.overlay import overlay_png
from sam_fast_serve.common.labels import LABEL_FORMATS, encode_labels, label_image
from sam_fast_serve.common.options import ImageSettings
from sam_fast_serve.common.wire import is_annotation_list, is_prompt_response

# The files an image's outcome comes with, in the order they are written.
Files = list[tuple[Path, bytes]]


@dataclass(frozen=True)
class Outcome:
    """What became of one image, with its line for the console. `reason` is set when it failed,
    with the HTTP `status` of the server's error answer (None without one); otherwise `size` is
    its (width, height) when a COCO file is wanted, and `skipped` says an earlier run did it.
    `sent`: a request went out for it. `refused`: the server refused the token."""

    image: InputImage
    line: str = ""
    skipped: bool = False
    size: tuple[int, int] | None = None
    status: int | None = None
    reason: str | None = None
    sent: bool = False
    refused: bool = False

    @classmethod
    def failure(
        cls, image: InputImage, reason: str, status: int | None = None, sent: bool = False, refused: bool = False
    ) -> Outcome:
        shown = f"HTTP {status}: {reason}" if status is not None else reason
        return cls(image, f"{image.path}: FAILED: {shown}", status=status, reason=reason, sent=sent, refused=refused)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (parent folders created): what the block writes there
    replaces `path` when the block ends, and is removed if the block raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename; hidden and .tmp, so no folder search picks it up.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_files(outcome: Outcome, files: Files) -> Outcome:
    """Write `files` in order, each atomically; the outcome, or a failure if one cannot be written."""
    try:
        for path, data in files:
            with replacing(path) as temp:
                temp.write_bytes(data)
    except OSError as exc:
        return Outcome.failure(outcome.image, f"cannot write the result: {exc}", sent=outcome.sent)
    return outcome


@dataclass(frozen=True)
class Results:
    """The files a run writes for each image under `out`: the .json always, the overlay and a
    label image (format `labels`, one of LABEL_FORMATS) if asked; `coco`: each outcome carries
    the image's size. `image`: the request's image options, with which overlays show the image;
    `banner`: text drawn across the top of every overlay; `concepts`: the concepts every request
    of the run asks for (none: automatic masks or prompts)."""

    out: Path
    overlay: bool = True
    labels: str | None = None
    coco: bool = False
    image: ImageSettings = field(default_factory=ImageSettings)
    banner: str | None = None
    concepts: tuple[str, ...] = ()

    def suffixes(self) -> list[str]:
        """The suffixes of the files written for each image."""
        return [
            RESULT_SUFFIX,
            *([OVERLAY_SUFFIX] if self.overlay else []),
            *([LABEL_FORMATS[self.labels]] if self.labels else []),
        ]

    def earlier(self, image: InputImage) -> Any | None:
        """The answer an earlier run wrote for `image`, if it is there, valid and of the kind its
        prompts ask for (or this run's concepts: records of another concept are sent again, since
        the COCO file has no category for them); else None."""
        try:
            with open(image.result(self.out), "rb") as f:
                payload = json.load(f)
            mask_size(payload)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if self.concepts:
            return payload if is_concept_list(payload, self.concepts) else None
        expected = is_prompt_response if image.prompts else is_annotation_list
        return payload if expected(payload) else None

    def answered(self, image: InputImage, data: bytes, answer: Answer, latency: float) -> tuple[Outcome, Files]:
        """The outcome of a new answer for `image` (file bytes `data`), and its files."""
        try:
            size, files = self._extras(image, answer.payload, data, only_missing=False)
        except Exception as exc:  # decoders raise many types: each is this image's failure
            reason = f"segmented, but the image cannot be drawn or measured: {exc}"
            return Outcome.failure(image, reason, sent=True), []
        files.append((image.result(self.out), json.dumps(answer.payload).encode()))
        written = ", ".join(str(path) for path, _ in [files[-1], *files[:-1]])
        masks = len(masks_of(answer.payload))
        line = f"{image.path}: {masks} masks, {latency:.2f} s, {answer.size} bytes -> {written}"
        return Outcome(image, line, size=size, sent=True), files

    def resumed(self, image: InputImage, payload: Any) -> tuple[Outcome, Files]:
        """The outcome of an image an earlier run did (its `payload`), with the overlay and label
        image it lacks, drawn here: nothing is sent."""
        try:
            size, files = self._extras(image, payload, None, only_missing=True)
        except Exception as exc:  # decoders raise many types: each is this image's failure
            return Outcome.failure(image, f"done earlier, but the image cannot be drawn or measured: {exc}"), []
        return Outcome(image, skipped=True, size=size), files

    def _extras(
        self, image: InputImage, payload: Any, data: bytes | None, only_missing: bool
    ) -> tuple[tuple[int, int] | None, Files]:
        """The image's (width, height) if a COCO file is wanted, and its overlay and label image
        (only those not there yet if `only_missing`). `data` is the file's bytes, read here when
        None and an overlay is drawn. Raises what a decoder raises for an image it cannot read."""
        masks = masks_of(payload)
        wanted = {suffix for suffix in self.suffixes() if suffix != RESULT_SUFFIX}
        if only_missing:
            wanted = {suffix for suffix in wanted if not image.output(self.out, suffix).exists()}
        size = None
        if self.coco or (self.labels and LABEL_FORMATS[self.labels] in wanted):
            size = mask_size(payload) or header_size(image.path, self.image.page)
        files = []
        if OVERLAY_SUFFIX in wanted:
            data = image.path.read_bytes() if data is None else data
            prompts = image.prompts
            drawn = overlay_png(
                data, masks, prompts.points, prompts.labels, prompts.boxes, self.image, banner=self.banner
            )
            files.append((image.output(self.out, OVERLAY_SUFFIX), drawn))
        if self.labels and size and LABEL_FORMATS[self.labels] in wanted:
            width, height = size
            labels = encode_labels(label_image(masks, (height, width)), self.labels)
            files.append((image.output(self.out, LABEL_FORMATS[self.labels]), labels))
        return (size if self.coco else None), files


def write_coco_file(path: Path, images: Sequence[CocoImage], concepts: Sequence[str] = ()) -> int:
    """One COCO instances dataset of `images` (in id order) at `path`, written atomically, its
    categories the run's `concepts` (none: one "object"); the annotation count. Raises OSError or
    ValueError when a result file cannot be read."""
    with replacing(path) as temp, open(temp, "w") as stream:
        return write_coco(stream, sorted(images, key=lambda image: image.id), concepts)
