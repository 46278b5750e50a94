"""The engine the service talks to, whatever the model family: automatic mask generation for a group
of images, masks for prompts or for concepts on an image or on a cached image's embedding, warm-up,
and what it keeps in the embedding store.

A family (models/<family>/__init__.py) builds and prepares its model, says what one embedding holds
(`embedding_layout`: the tensors the shared store checks every entry against), and gives the engine
what it serves: a predictor of prompts (the `Predictor` protocol below) and a generator
(`Generator`), or a predictor of concepts (`Conceptor`), and a tracker (`Tracker`). The engine does
what is the same for every family: pinning a group's embeddings, timing the stages, finding a cached
image. Inputs are decoded images (or a cached image's id) and validated settings; outputs are
payloads of builtins, ready for the wire. Failures are exceptions: the service maps them to replies.
"""

from __future__ import annotations

import collections.abc
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch

from sam_fast_serve.common.concepts import Concepts, parse_concepts
from sam_fast_serve.common.errors import NotFound
from sam_fast_serve.common.options import AmgSettings
from sam_fast_serve.common.prompts import Prompts, parse_prompts
from sam_fast_serve.common.tracks import TrackRequest
from sam_fast_serve.models.embedding import EmbeddingStore, ImageEmbedding
from sam_fast_serve.models.registry import Family, ModelType
from sam_fast_serve.models.timing import ENGINE_STAGES, StageClock


@dataclass
class Segmented:
    """One image's answer (builtins), the masks in it, and the seconds each engine stage took for it."""

    payload: Any
    masks: int
    seconds: dict[str, float]
    size: tuple[int, int] = (0, 0)  # the image's (H, W)


class ImageHolder(Protocol):
    """What every family's predictor does: one current image, set from pixels or from an embedding
    (the store's, by key)."""

    clock: StageClock
    store: EmbeddingStore
    original_size: tuple[int, int] | None

    def set_image(self, image: np.ndarray) -> None: ...

    def fetch(self, key: str) -> ImageEmbedding | None: ...

    def set_embedding(self, embedding: ImageEmbedding) -> None: ...


class Predictor(ImageHolder, Protocol):
    """A family's predictor of prompts: masks for points, boxes and mask prompts on the current image."""

    def segment_prompts(self, prompts: Prompts) -> list[dict[str, Any]]: ...


class Conceptor(ImageHolder, Protocol):
    """A family's predictor of concepts: every instance of each concept on the current image
    (common.concepts' records)."""

    def segment_concepts(self, concepts: Concepts, max_masks: int) -> list[dict[str, Any]]: ...


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
WARM_UP_AMG: dict[str, Any] = {
    "points_per_side": 8,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
}


def warm_up_settings(family: Family) -> AmgSettings:
    """The warm-up's AMG settings in `family`'s own settings type (its other keys at their defaults)."""
    assert family.amg_settings is not None, "a family with automatic mask generation"
    return family.amg_settings(**WARM_UP_AMG)


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
    predictor (with the embedding store): a Predictor of prompts or a Conceptor. make_generator:
    settings -> the family's generator, sharing that predictor; None for a family without automatic
    mask generation. warm_up_run: what the family runs once before serving. make_tracker: the
    family's video tracker, made at the first video request; None for a still-image family. What a
    family does not serve the service refuses before the engine runs (models.registry.Family), and
    what this model's checkpoint cannot (`unserved`: a request mode, server.jobs.Job.mode, and why).
    """

    def __init__(
        self,
        model: ModelType,
        dtype: torch.dtype,
        predictor: ImageHolder,
        make_generator: Callable[[AmgSettings], Generator] | None,
        warm_up_run: Callable[[], None],
        make_tracker: Callable[[], Tracker] | None = None,
        unserved: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.predictor = predictor
        self.generator = make_generator
        self._warm_up = warm_up_run
        self._make_tracker = make_tracker
        self._tracker: Tracker | None = None
        self.unserved: Mapping[str, str] = unserved or {}

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
        assert self.generator is not None, "the service refuses automatic requests for a family without them"
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

    def _set_current(self, image: np.ndarray | None, image_id: str) -> tuple[int, int]:
        """Make `image`, or the cached embedding of `image_id` when `image` is None, the predictor's
        current image; its (H, W). NotFound when no store has the id, ServiceUnavailable when the
        shared store cannot answer."""
        predictor = self.predictor
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
        return predictor.original_size

    def prompted(self, image: np.ndarray | None, image_id: str, prompt_fields: dict[str, Any]) -> Segmented:
        """{"image_id", "prompts": [...]} for the prompts on `image`, or on the cached embedding of
        `image_id` when `image` is None (`_set_current`'s errors)."""
        # The family says what its predictor answers (an isinstance check of a protocol with data
        # members would ask for attributes a predictor sets only once an image is set).
        assert self.model.family.prompts, "the service refuses prompts for a family without them"
        predictor = cast(Predictor, self.predictor)
        predictor.clock.take()
        start = time.perf_counter()
        size = self._set_current(image, image_id)
        answers = predictor.segment_prompts(parse_prompts(prompt_fields, size, self.model.mask_input_side))
        seconds = _stage_seconds(predictor.clock.take(), time.perf_counter() - start)
        masks = sum(len(answer["masks"]) for answer in answers)
        return Segmented({"image_id": image_id, "prompts": answers}, masks, seconds)

    def concepts(
        self, image: np.ndarray | None, image_id: str, concept_fields: dict[str, Any], max_masks: int
    ) -> Segmented:
        """The records of every instance of each concept (common.concepts) on `image`, or on the
        cached embedding of `image_id` when `image` is None, at most `max_masks` in all (the best by
        score); `_set_current`'s errors, InvalidOption when an exemplar box lies outside the cached
        image."""
        assert self.model.family.concepts, "the service refuses concepts for a family without them"
        predictor = cast(Conceptor, self.predictor)
        predictor.clock.take()
        start = time.perf_counter()
        size = self._set_current(image, image_id)
        records = predictor.segment_concepts(parse_concepts(concept_fields, size), max_masks)
        seconds = _stage_seconds(predictor.clock.take(), time.perf_counter() - start)
        return Segmented(records, len(records), seconds, size)

    def track(
        self, frames: Callable[[int], np.ndarray], count: int, request: TrackRequest
    ) -> collections.abc.Generator[tuple[int, list[dict[str, Any]]], None, None]:
        """(i, the objects' records on frame i) for each of the `count` frames `frames` reads that the
        request tracks, in the order tracked (common.tracks). The tracker is made the first time."""
        assert self._make_tracker is not None, "the service refuses video requests for a still-image family"
        if self._tracker is None:
            self._tracker = self._make_tracker()
        return self._tracker.track(frames, count, request)
