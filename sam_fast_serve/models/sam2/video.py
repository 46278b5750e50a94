"""Objects followed through the frames of a video or a time-lapse stack with SAM 2's video predictor,
in memory that grows with its memory bank, not with the number of frames.

SAM2VideoPredictor.init_state reads a folder of JPEG files and keeps every frame, resized and
normalised (12 MiB a frame at 1024 x 1024), and its tracking keeps the outputs of every frame it has
visited. Here frames come one at a time from a `FrameReader` (any source that can give frame i as an
RGB uint8 array: the pages of a TIFF, the frames of a decoded video), are prepared exactly as
init_state prepares a JPEG frame, and the outputs of frames the predictor can no longer read are
dropped as tracking moves on (`_forget_beyond_reach`). Masks equal SAM2VideoPredictor's on the same
frames and prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from sam2 import sam2_video_predictor as video_predictor
from sam2.sam2_video_predictor import SAM2VideoPredictor

# SAM 2's normalisation of a frame (sam2.utils.misc.load_video_frames' defaults).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# Decoded frames kept at once: the prompted frame and the one tracking is on.
CACHED_FRAMES = 2

FrameReader = Callable[[int], np.ndarray]


class LazyFrames:
    """The `images` of an inference state: frame i prepared when the predictor asks for it.

    read: frame i as an RGB uint8 (H, W, 3) array, every frame the same size.
    count: the number of frames.
    image_size: the model's input side; each frame is resized to image_size x image_size by PIL's
        default (bicubic) filter, scaled to [0, 1] and normalised, as init_state does a JPEG frame.
    """

    def __init__(self, read: FrameReader, count: int, image_size: int) -> None:
        self.read = read
        self.count = count
        self.image_size = image_size
        self.mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        first = read(0)
        self.height, self.width = first.shape[:2]
        self._cache[0] = self._prepare(first)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(f"frame {index} of {self.count}")
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        frame = self.read(index)
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]}, frame 0 {self.width}x{self.height}")
        self._cache[index] = self._prepare(frame)
        while len(self._cache) > CACHED_FRAMES:
            self._cache.popitem(last=False)
        return self._cache[index]

    def _prepare(self, frame: np.ndarray) -> torch.Tensor:
        side = self.image_size
        resized = np.array(Image.fromarray(frame).convert("RGB").resize((side, side))) / 255.0
        image = torch.from_numpy(resized).permute(2, 0, 1).to(torch.float32)
        image -= self.mean
        image /= self.std
        return image


def init_state(predictor: SAM2VideoPredictor, frames: LazyFrames) -> dict[str, Any]:
    """SAM2VideoPredictor.init_state over `frames` (nothing offloaded): its own code, with the
    frame loader it calls, which only reads JPEG folders, answering with `frames`."""

    def load_video_frames(**_: Any) -> tuple[LazyFrames, int, int]:
        return frames, frames.height, frames.width

    original = video_predictor.load_video_frames
    video_predictor.load_video_frames = load_video_frames
    try:
        return predictor.init_state(video_path="")
    finally:
        video_predictor.load_video_frames = original


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's result: for each object (`object_ids`, in the order objects were first
    prompted) its mask logits at the frame's size (N, H, W) and its object score logit (N,)."""

    frame: int
    object_ids: tuple[int, ...]
    mask_logits: torch.Tensor
    object_scores: torch.Tensor


def reach(predictor: SAM2VideoPredictor) -> int:
    """How many frames away from the one being tracked the predictor still reads an output: its
    memory frames (num_maskmem - 1, every memory_temporal_stride_for_eval-th, plus the last two)
    and its object pointers (max_obj_ptrs_in_encoder - 1 frames)."""
    memory = (predictor.num_maskmem + 1) * max(1, predictor.memory_temporal_stride_for_eval)
    return max(memory, predictor.max_obj_ptrs_in_encoder)


def propagate(
    predictor: SAM2VideoPredictor,
    state: dict[str, Any],
    start: int | None = None,
    count: int | None = None,
    reverse: bool = False,
) -> Iterator[TrackedFrame]:
    """SAM2VideoPredictor.propagate_in_video (same arguments), a TrackedFrame per frame, forgetting
    each output as soon as no later frame of this pass or of a later one can read it. A later pass
    must start at a prompted frame (`start` None: the first one, as SAM 2 does)."""
    limit = reach(predictor)
    for frame, object_ids, masks in predictor.propagate_in_video(state, start, count, reverse):
        scores = torch.stack(
            [_output(state, index, frame)["object_score_logits"].reshape(()) for index in range(len(object_ids))]
        )
        yield TrackedFrame(frame, tuple(object_ids), masks[:, 0], scores.float())
        _forget_beyond_reach(state, frame, limit)


def _output(state: dict[str, Any], object_index: int, frame: int) -> dict[str, Any]:
    outputs = state["output_dict_per_obj"][object_index]
    found = outputs["cond_frame_outputs"].get(frame)
    return found if found is not None else outputs["non_cond_frame_outputs"][frame]


def _forget_beyond_reach(state: dict[str, Any], frame: int, limit: int) -> None:
    """Drop the non-conditioning outputs more than `limit` frames from `frame` and from every
    object's conditioning frames: tracking goes on away from `frame`, and a later pass starts at a
    conditioning frame (of any object: each pass tracks every object), so nothing reads them again."""
    per_object = state["output_dict_per_obj"].values()
    anchors = {frame}.union(*(outputs["cond_frame_outputs"] for outputs in per_object))
    for outputs in per_object:
        stale = [t for t in outputs["non_cond_frame_outputs"] if min(abs(t - a) for a in anchors) > limit]
        for t in stale:
            del outputs["non_cond_frame_outputs"][t]
