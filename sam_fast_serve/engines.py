"""Running the engines: automatic mask generation for a group of images, masks for prompts.

Inputs are decoded images (or a cached image's id) and validated settings; outputs are payloads of
builtins, ready for the wire. Failures are exceptions: the service maps them to replies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam

from .automatic import SamAutomaticMaskGenerator
from .config import AmgSettings, ServiceConfig
from .errors import NotFound
from .fast_decoder import FastMaskDecoder
from .metrics import ENGINE_STAGES
from .predictor import FastSamPredictor
from .prompted import segment_prompts
from .prompts import parse_prompts
from .store import EmbeddingStore


@dataclass
class Segmented:
    """One image's answer (builtins), the masks in it, and the seconds each engine stage took for it."""

    payload: Any
    masks: int
    seconds: dict[str, float]


def _stage_seconds(measured: Mapping[str, float], elapsed: float) -> dict[str, float]:
    """Every engine stage's seconds (0 for a stage skipped); postprocess is what the clock's
    stages do not account for of `elapsed`."""
    seconds = {stage: measured.get(stage, 0.0) for stage in ENGINE_STAGES}
    seconds["postprocess"] = max(0.0, elapsed - sum(measured.values()))
    return seconds


class Engines:
    """A prepared SAM model, its predictor (fast decoder, embedding cache) and the limits of the
    config it serves."""

    def __init__(self, config: ServiceConfig, sam: Sam, dtype: torch.dtype, store: EmbeddingStore) -> None:
        self.config = config
        self.sam = sam
        self.dtype = dtype
        self.predictor = FastSamPredictor(sam, FastMaskDecoder(sam.mask_decoder, dtype), store)

    def generator(self, settings: AmgSettings, predictor: FastSamPredictor | None = None) -> SamAutomaticMaskGenerator:
        """A generator for one set of AMG settings, sharing this model's predictor (decoder and
        embedding store) unless given another."""
        return SamAutomaticMaskGenerator(
            self.sam,
            **settings.generator_arguments(),
            output_mode="coco_rle",
            process_batch_size=self.config.process_batch_size,
            predictor=predictor or self.predictor,
        )

    def warm_up(self) -> None:
        """Run one small image through every stage (encoder, decoder, masks), so that kernel
        selection, first-touch allocations and, with `compile`, compilation are not paid by a request.
        Its predictor shares the decoder but keeps nothing: a blank warm-up image has no place in
        the embedding store, and a shared store that is down must not slow or log a worker's start."""
        image = np.zeros((64, 64, 3), dtype=np.uint8)
        settings = AmgSettings(points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        self.generator(settings, FastSamPredictor(self.sam, self.predictor.decoder)).generate(image)

    def automatic(self, images: list[np.ndarray], settings: AmgSettings) -> list[Segmented]:
        """Each image's mask records (coco_rle, builtins), at most `max_masks` each; the images go
        through the image encoder together, and share that call's seconds evenly."""
        clock = self.predictor.clock
        generator = self.generator(settings)
        clock.take()
        results = []
        with generator.pinned(images):
            pinning = clock.take()
            for image in images:
                start = time.perf_counter()
                records = self._best(generator.generate(image))
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
        prompts = parse_prompts(prompt_fields, predictor.original_size)
        answers = segment_prompts(predictor, prompts)
        seconds = _stage_seconds(predictor.clock.take(), time.perf_counter() - start)
        masks = sum(len(answer["masks"]) for answer in answers)
        return Segmented({"image_id": image_id, "prompts": answers}, masks, seconds)

    def _best(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """At most `max_masks` records: the best by predicted IoU, in their original order."""
        if len(records) <= self.config.max_masks:
            return records
        ranked = sorted(range(len(records)), key=lambda i: records[i]["predicted_iou"], reverse=True)
        return [records[i] for i in sorted(ranked[: self.config.max_masks])]
