"""Video requests: objects followed through the frames of a video file or a multi-page TIFF.

A video request carries the file (JSON "video": <base64>, or a multipart part named "video") and
these options, shared by the server (which checks them) and the client (which writes them):

    prompts       [{"frame": i, "object": id, "points": [[x, y], ...], "labels": [1, ...]},
                   {"frame": j, "object": id2, "boxes": [[x0, y0, x1, y1]]},
                   {"frame": k, "object": id3, "mask": <COCO RLE of the frame's size>}, ...]
                  in the video's frame numbers and pixels; points and a box may share a prompt
    direction     "forward" (from the first prompted frame to the end), "backward" (from the last
                  prompted frame to the start) or "both" (forward, then backward from the first
                  prompted frame): every frame tracked is answered once
    frame_range   [first, last]: the frames tracked (inclusive; default every frame)
    frame_stride  every n-th frame of the range from its first (default 1)

Without `prompts`, automatic mask generation runs on frame `automatic_frame` (default the first
tracked; the AMG options of an image request apply) and each mask it keeps is an object, ids 1, 2,
... in its answer's order: "segment everything, then follow it".

The answer, a record a line: what is tracked, {"frames": n, "objects": [ids]}; then a record a
frame, in the order tracked, {"frame": i, "objects": [{"object": id, "segmentation": <COCO RLE>,
"area", "bbox": [x, y, w, h], "score": P(the object is in the frame)}]}; then the summary,
{"done": true, "frames": n, "objects": [ids]}, or the error that ended the answer early.
Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sam_fast_serve.common.errors import InvalidOption
from sam_fast_serve.common.prompts import Prompts, parse_prompts

VIDEO_FIELD = "video"
DIRECTIONS = ("forward", "backward", "both")
DEFAULT_DIRECTION = "both"
TRACK_OPTIONS = ("prompts", "automatic_frame", "direction", "frame_range", "frame_stride")
# What one prompt may hold: where, whose, and what marks the object there.
PROMPT_KEYS = ("frame", "object", "points", "labels", "boxes", "mask")
MAX_PROMPTS = 256
MAX_OBJECT_ID = 2**31 - 1


@dataclass(frozen=True)
class ObjectPrompt:
    """One object marked on one frame (`frame`: an index into the frames tracked): points and/or
    one box (`prompts`, in the frame's pixels), or a mask (a COCO RLE of the frame's size)."""

    frame: int
    object: int
    prompts: Prompts | None
    mask: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TrackRequest:
    """A checked video request: the video frames tracked (`frames`, their numbers in the video),
    the prompts on them and the direction; or, without prompts, the frame automatic mask
    generation runs on (`automatic`, an index into the frames tracked)."""

    frames: range
    prompts: tuple[ObjectPrompt, ...]
    direction: str
    automatic: int | None = None

    def with_masks(self, masks: list[Mapping[str, Any]]) -> TrackRequest:
        """This automatic request with each of `masks` (COCO RLE) an object on its frame, ids 1, 2, ..."""
        assert self.automatic is not None
        prompts = tuple(ObjectPrompt(self.automatic, obj, None, mask) for obj, mask in enumerate(masks, start=1))
        return TrackRequest(self.frames, prompts, self.direction)


def _integer(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidOption(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _frames(options: Mapping[str, Any], count: int) -> range:
    last = count - 1
    bounds = options.get("frame_range", [0, last])
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise InvalidOption(f"'frame_range' must be [first, last], frame numbers from 0 to {last}; got {bounds!r}")
    first = _integer(bounds[0], "'frame_range' first", 0, last)
    end = _integer(bounds[1], "'frame_range' last", first, last)
    stride = _integer(options.get("frame_stride", 1), "'frame_stride'", 1, count)
    return range(first, end + 1, stride)


def _mask(value: Any, size: tuple[int, int]) -> Mapping[str, Any]:
    height, width = size
    if not (isinstance(value, dict) and isinstance(value.get("counts"), str) and value.get("size") == [height, width]):
        raise InvalidOption(
            f"'mask' must be a COCO RLE of the frame's size, {{'size': [{height}, {width}], 'counts': <string>}}"
        )
    return value


def _object_prompt(value: Any, frames: range, size: tuple[int, int], index: int) -> ObjectPrompt:
    where = f"prompt {index}"
    if not isinstance(value, dict):
        raise InvalidOption(f"{where} must be an object like {{'frame': 0, 'object': 1, 'points': [[x, y]]}}")
    unknown = sorted(set(value) - set(PROMPT_KEYS))
    if unknown:
        raise InvalidOption(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(PROMPT_KEYS)}"
        )
    if "frame" not in value or "object" not in value:
        raise InvalidOption(f"{where} needs 'frame' (a frame number) and 'object' (an integer id)")
    index = _tracked(_integer(value["frame"], f"{where}'s 'frame'", 0, 2**31), frames, where)
    obj = _integer(value["object"], f"{where}'s 'object'", 0, MAX_OBJECT_ID)
    marks = {key: value[key] for key in ("points", "labels", "boxes") if key in value}
    if "mask" in value:
        if marks:
            raise InvalidOption(f"{where} has a 'mask' and {', '.join(marks)}: a mask prompt stands alone")
        return ObjectPrompt(index, obj, None, _mask(value["mask"], size))
    if "points" not in marks and "boxes" not in marks:
        raise InvalidOption(f"{where} needs 'points', 'boxes' or 'mask'")
    try:
        prompts = parse_prompts(marks, size, None)  # no mask_input among them
    except InvalidOption as error:
        raise InvalidOption(f"{where}: {error.message}") from None
    if prompts.boxes is not None and len(prompts.boxes) > 1:
        raise InvalidOption(f"{where} has {len(prompts.boxes)} boxes: an object takes one box a frame")
    return ObjectPrompt(index, obj, prompts)


def _tracked(frame: int, frames: range, where: str) -> int:
    """The index among `frames` of video frame `frame`; InvalidOption when it is not tracked."""
    if frame not in frames:
        raise InvalidOption(
            f"{where} is on frame {frame}, which is not tracked: the frames tracked are {frames.start} to "
            f"{frames[-1]} every {frames.step}"
        )
    return frames.index(frame)


def parse_track_request(
    options: Mapping[str, Any], count: int, size: tuple[int, int], automatic: bool = False
) -> TrackRequest:
    """Check a video request's options against its video (`count` frames of `size` (H, W));
    `automatic`: whether the request gave AMG options (which need no prompts).

    Raises InvalidOption (422) naming the option or the prompt: unknown options, a frame out of the
    video or not tracked, two prompts for one object on one frame, prompts outside the frame.
    """
    unknown = sorted(set(options) - set(TRACK_OPTIONS))
    if unknown:
        raise InvalidOption(
            f"option(s) {', '.join(map(repr, unknown))} do not apply to a video request; its options: "
            f"{', '.join(TRACK_OPTIONS)}, the image options channels and intensity, and without prompts AMG's"
        )
    direction = options.get("direction", DEFAULT_DIRECTION)
    if direction not in DIRECTIONS:
        raise InvalidOption(f"'direction' must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    frames = _frames(options, count)
    raw = options.get("prompts")
    if raw is None:
        frame = _integer(options.get("automatic_frame", frames.start), "'automatic_frame'", 0, 2**31)
        return TrackRequest(frames, (), direction, _tracked(frame, frames, "'automatic_frame'"))
    if "automatic_frame" in options or automatic:
        raise InvalidOption("'automatic_frame' and AMG options apply to a video request without 'prompts'")
    if not isinstance(raw, list) or not raw:
        raise InvalidOption(
            "'prompts' must be a list like [{'frame': 0, 'object': 1, 'points': [[x, y]]}]; "
            "without it, automatic mask generation finds the objects"
        )
    if len(raw) > MAX_PROMPTS:
        raise InvalidOption(f"'prompts' has {len(raw)} entries; at most {MAX_PROMPTS} are allowed")
    prompts = tuple(_object_prompt(value, frames, size, index) for index, value in enumerate(raw))
    seen: set[tuple[int, int]] = set()
    for prompt in prompts:
        key = (prompt.frame, prompt.object)
        if key in seen:
            raise InvalidOption(
                f"object {prompt.object} has two prompts on frame {frames[prompt.frame]}: give its points and box in one"
            )
        seen.add(key)
    return TrackRequest(frames, prompts, direction)
