"""The engine the service talks to, whatever the model family: automatic mask generation for a group
of images, masks for prompts on an image or on a cached image's embedding, warm-up, and what it
keeps in the embedding store.

A family (models/<family>/__init__.py) builds and prepares its model, says what one embedding holds
(`embedding_layout`: the tensors the shared store checks every entry against), and gives the engine
its predictor (the `Predictor` protocol below) and its generator (`Generator`). The engine does what
is the same for every family: pinning a group's embeddings, timing the stages, finding a cached
image. Inputs are decoded images (or a cached image's id) and validated settings; outputs are
payloads of builtins, ready for the wire. Failures are exceptions: the service maps them to replies.
"""

from __future__ import annotations

import collections.abc
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sam_fast_serve.common.errors import NotFound
from sam_fast_serve.common.options import AmgSettings
from sam_fast_serve.common.prompts import Prompts, parse_prompts
from sam_fast_serve.common.tracks import TrackRequest
from sam_fast_serve.models.embedding import EmbeddingStore, ImageEmbedding
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.timing import ENGINE_STAGES, StageClock


@dataclass
class Segmented:
    """One image's answer (builtins), the masks in it, and the seconds each engine stage took for it."""

    payload: Any
    masks: int
    seconds: dict[str, float]


class Predictor(Protocol):
    """A family's predictor: one current image (set from pixels or from an embedding), masks for
    prompts on it, and embeddings pinned for a group of images."""

    clock: StageClock
    store: EmbeddingStore
    original_size: tuple[int, int] | None

    def set_image(self, image: np.ndarray) -> None: ...

    def fetch(self, key: str) -> ImageEmbedding | None: ...

    def set_embedding(self, embedding: ImageEmbedding) -> None: ...

    def segment_prompts(self, prompts: Prompts) -> list[dict[str, Any]]: ...


class Generator(Protocol):
    """A family's automatic mask generator for one set of settings."""

    def pinned(self, images: Sequence[np.ndarray]) -> AbstractContextManager[None]: ...

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]: ...


class Tracker(Protocol):
    """A family's video tracker: the objects of a request followed through its frames."""

    def track(
        self, frames: Callable[[int], np.ndarray], count: int, request: TrackRequest
    ) -> collections.abc.Generator[tuple[int, list[dict[str, Any]]], None, None]: ...


# What the warm-up runs: one whole decoder batch of the default size (64 prompts, every mask kept)
# on a photo-sized image, so that kernel selection for the real shapes, first-touch of the
# decoder's largest activations and the upsampling weights of that size are paid before READY,
# not by the first request (a blank 64 x 64 image with 4 prompts left most of that to it).
WARM_UP_SIZE = (512, 512)
WARM_UP_SETTINGS = AmgSettings(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def warm_up_image() -> np.ndarray:
    """The warm-up's image: a smooth gradient (blank pixels would make every mask the same)."""
    y, x = np.mgrid[0 : WARM_UP_SIZE[0], 0 : WARM_UP_SIZE[1]]
    return np.stack([x * 255 // WARM_UP_SIZE[1], y * 255 // WARM_UP_SIZE[0], (x + y) % 256], axis=-1).astype(np.uint8)


def _stage_seconds(measured: Mapping[str, float], elapsed: float) -> dict[str, float]:
    """Every engine stage's seconds (0 for a stage skipped); postprocess is what the clock's
    stages do not account for of `elapsed`."""
    seconds = {stage: measured.get(stage, 0.0) for stage in ENGINE_STAGES}
    seconds["postprocess"] = max(0.0, elapsed - sum(measured.values()))
    return seconds


class Engine:
    """A prepared model of one family behind one interface.

    model: its model type. dtype: what its encoder and decoder compute in. predictor: the family's
    predictor (with the embedding store). make_generator: settings -> the family's generator,
    sharing that predictor. warm_up_run: what the family runs once before serving. make_tracker:
    the family's video tracker, made at the first video request; None for a still-image family.
    """

    def __init__(
        self,
        model: ModelType,
        dtype: torch.dtype,
        predictor: Predictor,
        make_generator: Callable[[AmgSettings], Generator],
        warm_up_run: Callable[[], None],
        make_tracker: Callable[[], Tracker] | None = None,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.predictor = predictor
        self.generator = make_generator
        self._warm_up = warm_up_run
        self._make_tracker = make_tracker
        self._tracker: Tracker | None = None

    @property
    def store(self) -> EmbeddingStore:
        return self.predictor.store

    def warm_up(self) -> None:
        """Run every stage once (encoder, decoder, masks), so that kernel selection and first-touch
        allocations are not paid by a request. Nothing it computes is kept in the store."""
        self._warm_up()

    def automatic(self, images: list[np.ndarray], settings: AmgSettings) -> list[Segmented]:
        """Each image's mask records (coco_rle, builtins); the images go through the image encoder
        together, and share that call's seconds evenly."""
        clock = self.predictor.clock
        generator = self.generator(settings)
        clock.take()
        results = []
        with generator.pinned(images):
            pinning = clock.take()
            for image in images:
                start = time.perf_counter()
                records = generator.generate(image)
                results.append(
                    Segmented(records, len(records), _stage_seconds(clock.take(), time.perf_counter() - start))
                )
        for result in results:
            for stage, seconds in pinning.items():
                result.seconds[stage] += seconds / len(results)
        return results

    def prompted(self, image: np.ndarray | None, image_id: str, prompt_fields: dict[str, Any]) -> Segmented:
        """{"image_id", "prompts": [...]} for the prompts on `image`, or on the cached embedding of
        `image_id` when `image` is None: NotFound when no store has it, ServiceUnavailable when the
        shared store cannot answer."""
        predictor = self.predictor
        predictor.clock.take()
        start = time.perf_counter()
        if image is not None:
            predictor.set_image(image)
        else:
            embedding = predictor.fetch(image_id)
            if embedding is None:
                where = "the embedding store" if predictor.store.shared else "this worker's embedding cache"
                raise NotFound(
                    f"image_id {image_id!r} is not in {where} (expired or evicted, or from another "
                    "worker or server run): send the image again"
                )
            predictor.set_embedding(embedding)
        assert predictor.original_size is not None
        answers = predictor.segment_prompts(parse_prompts(prompt_fields, predictor.original_size))
        seconds = _stage_seconds(predictor.clock.take(), time.perf_counter() - start)
        masks = sum(len(answer["masks"]) for answer in answers)
        return Segmented({"image_id": image_id, "prompts": answers}, masks, seconds)

    def track(
        self, frames: Callable[[int], np.ndarray], count: int, request: TrackRequest
    ) -> collections.abc.Generator[tuple[int, list[dict[str, Any]]], None, None]:
        """(i, the objects' records on frame i) for each of the `count` frames `frames` reads that the
        request tracks, in the order tracked (common.tracks). The tracker is made the first time."""
        assert self._make_tracker is not None, "the service refuses video requests for a still-image family"
        if self._tracker is None:
            self._tracker = self._make_tracker()
        return self._tracker.track(frames, count, request)
