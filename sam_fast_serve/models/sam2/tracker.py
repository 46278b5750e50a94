"""A video request's objects followed through its frames (common.tracks): SAM 2's video predictor
over frames read one at a time (video.py), its answer as a record a frame, in builtins for the wire.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from typing import Any

import torch
from pycocotools import mask as mask_utils
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_video_predictor import SAM2VideoPredictor

from sam_fast_serve.common.records import object_record, rle_to_builtins
from sam_fast_serve.common.tracks import ObjectPrompt, TrackRequest
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.rle import encode_masks, rle_areas
from sam_fast_serve.models.sam2.build import build_video, faster_encoders
from sam_fast_serve.models.sam2.components import labelling_sam2s_own
from sam_fast_serve.models.sam2.memory import cheaper_memory_attention
from sam_fast_serve.models.sam2.video import FrameReader, LazyFrames, TrackedFrame, init_state, propagate


def video_predictor(model: ModelType, net: SAM2Base) -> SAM2VideoPredictor:
    """SAM 2's video predictor of `model` holding `net`'s weights (the same tensors, no copy), on
    `net`'s device, its encoders faster (build.faster_encoders) and its memory attention cheaper
    (memory.py)."""
    predictor = build_video(model)
    predictor.load_state_dict(net.state_dict(), assign=True)
    faster_encoders(predictor)
    cheaper_memory_attention(predictor)
    device = next(net.parameters()).device
    return predictor.to(device).eval()


class Sam2Tracker:
    """Follows the objects of a TrackRequest with `predictor`, computing in `dtype` (autocast
    where it is not float32, as SAM 2 does on CUDA), small holes in each frame's masks filled as
    SAM 2 fills them with its `_C` extension (components.py)."""

    def __init__(self, predictor: SAM2VideoPredictor, dtype: torch.dtype) -> None:
        self.predictor = predictor
        self.dtype = dtype

    def track(
        self, frames: FrameReader, count: int, request: TrackRequest
    ) -> Generator[tuple[int, list[dict[str, Any]]], None, None]:
        """(i, the objects' records on frame i) for each frame i of `count` tracked, in the order
        tracked; prompts and i index the frames read by `frames`. The predictor's state lives as
        long as the iteration: closing the iterator early frees it.

        Each step runs under inference mode, autocast and our labelling entered here, around it,
        and left before the caller resumes: leaving inference mode restores the dispatch keys it
        found, autocast's among them, so an autocast entered inside an inference-mode generator
        (SAM 2's propagate_in_video is one) is gone after its first yield (every later frame in
        float32)."""
        steps = self._steps(frames, count, request)
        try:
            while True:
                with self._computing():
                    step = next(steps, None)
                if step is None:
                    return
                yield step
        finally:
            with self._computing():
                steps.close()

    def _computing(self) -> contextlib.ExitStack:
        contexts = contextlib.ExitStack()
        contexts.enter_context(torch.inference_mode())
        device = self.predictor.device
        contexts.enter_context(torch.autocast(device.type, self.dtype, enabled=self.dtype != torch.float32))
        contexts.enter_context(labelling_sam2s_own())
        return contexts

    def _steps(
        self, frames: FrameReader, count: int, request: TrackRequest
    ) -> Generator[tuple[int, list[dict[str, Any]]], None, None]:
        predictor = self.predictor
        state = init_state(predictor, LazyFrames(frames, count, predictor.image_size))
        try:
            for prompt in request.prompts:
                _add(predictor, state, prompt)
            for tracked in _passes(predictor, state, request):
                yield tracked.frame, _records(tracked)
        finally:
            state.clear()


def _add(predictor: SAM2VideoPredictor, state: dict[str, Any], prompt: ObjectPrompt) -> None:
    if prompt.mask is not None:
        mask = mask_utils.decode(dict(prompt.mask)).astype(bool)
        predictor.add_new_mask(state, prompt.frame, prompt.object, mask)
        return
    marks = prompt.prompts
    assert marks is not None
    predictor.add_new_points_or_box(
        state,
        prompt.frame,
        prompt.object,
        points=marks.points,
        labels=marks.labels,
        box=None if marks.boxes is None else marks.boxes[0],
    )


def _passes(predictor: SAM2VideoPredictor, state: dict[str, Any], request: TrackRequest) -> Iterator[TrackedFrame]:
    """Each frame of the request's direction once: forward from the first prompted frame, backward
    from the last, or both from the first (which the backward pass does not answer again)."""
    marked = [prompt.frame for prompt in request.prompts]
    if request.direction in ("forward", "both"):
        yield from propagate(predictor, state, min(marked))
    if request.direction == "backward":
        yield from propagate(predictor, state, max(marked), reverse=True)
    if request.direction == "both":
        for tracked in propagate(predictor, state, min(marked), reverse=True):
            if tracked.frame != min(marked):
                yield tracked


def _records(tracked: TrackedFrame) -> list[dict[str, Any]]:
    rles = encode_masks(tracked.mask_logits > 0)
    scores = torch.sigmoid(tracked.object_scores).tolist()
    return [
        object_record(obj, rle_to_builtins(rle), area, box, score)
        for obj, rle, area, box, score in zip(
            tracked.object_ids, rles, rle_areas(rles), mask_utils.toBbox(rles), scores, strict=True
        )
    ]
