"""The mask service: request fields in, (status, body, content type) out. Imports nothing from ts.

Data flows one way: parse_request -> decode_image -> SamAutomaticMaskGenerator -> wire encoding.
"""

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .automatic import SamAutomaticMaskGenerator
from .build import prepare_model, resolve_dtype, sam_model_fast_registry, select_device
from .checkpoints import official_for_model_type, resolve_checkpoint
from .config import AmgSettings, ServiceConfig, apply_request_options, load_service_config
from .embeddings import EmbeddingCache
from .errors import OutOfMemory, ServiceError
from .fast_decoder import FastMaskDecoder
from .imaging import decode_image
from .payload import parse_request
from .wire import JSON_MEDIA_TYPE, annotation_to_builtins, encode_json, encode_pickled

logger = logging.getLogger(__name__)

PICKLE_CONTENT_TYPE = "text/plain; charset=us-ascii"


@dataclass
class Reply:
    """One response: HTTP status, body text and its content type."""

    status: int
    body: str
    content_type: str


def error_reply(error: ServiceError) -> Reply:
    return Reply(error.status, encode_json(error.to_body()), JSON_MEDIA_TYPE)


def wants_json(headers: Mapping[str, str]) -> bool:
    """Whether the client's Accept header asks for JSON (header names compared case-insensitively)."""
    accept = next((v for k, v in headers.items() if k.lower() == "accept" and isinstance(v, str)), "")
    return "application/json" in accept.lower()


def _is_out_of_memory(exc: BaseException) -> bool:
    # CPU allocation failures surface as RuntimeError from the default allocator.
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


@dataclass
class _Job:
    index: int
    image: np.ndarray
    settings: AmgSettings
    json: bool


class MaskService:
    """A loaded SAM model and the settings to answer automatic-mask requests with it."""

    def __init__(self, config: ServiceConfig, generator_model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.config = config
        self.sam = generator_model
        self.dtype = dtype
        self.decoder = FastMaskDecoder(self.sam.mask_decoder, dtype)
        self.embedding_cache = EmbeddingCache(config.embedding_cache_bytes)

    @classmethod
    def load(cls, handler_section: Optional[Mapping[str, Any]], model_dir: Path, gpu_id: Optional[int]) -> "MaskService":
        """Validate the config, check the checkpoint, build the model on the right device.

        Raises ConfigError naming the offending key or file.
        """
        started = time.perf_counter()
        config = load_service_config(handler_section)
        file_name = config.sam_checkpoint or official_for_model_type(config.model_type).file_name
        checkpoint = resolve_checkpoint(Path(model_dir), file_name, config.model_type)
        device = select_device(gpu_id)
        dtype = resolve_dtype(config.dtype, device)
        sam = sam_model_fast_registry[config.model_type](str(checkpoint))
        sam = prepare_model(sam, device, dtype, compile_encoder=config.compile)
        service = cls(config, sam, dtype)
        if config.compile:
            service.warm_up()
        logger.info(
            "loaded %s from %s on %s in %s in %.1f s",
            config.model_type, file_name, device, dtype, time.perf_counter() - started,
        )
        return service

    def warm_up(self) -> None:
        """Run one small image through the model so compilation happens at load, not on a request."""
        image = np.zeros((64, 64, 3), dtype=np.uint8)
        self.generator(AmgSettings(points_per_side=2, points_per_batch=4)).generate(image)

    def generator(self, settings: AmgSettings) -> SamAutomaticMaskGenerator:
        """A generator for one set of AMG settings, sharing this service's model and decoder."""
        return SamAutomaticMaskGenerator(
            self.sam,
            points_per_side=settings.points_per_side,
            points_per_batch=settings.points_per_batch,
            pred_iou_thresh=settings.pred_iou_thresh,
            stability_score_thresh=settings.stability_score_thresh,
            box_nms_thresh=settings.box_nms_thresh,
            crop_n_layers=settings.crop_n_layers,
            min_mask_region_area=settings.min_mask_region_area,
            output_mode="coco_rle",
            process_batch_size=self.config.process_batch_size,
            decoder=self.decoder,
            embedding_cache=self.embedding_cache,
        )

    def _parse(self, index: int, fields: Mapping[str, Any], headers: Mapping[str, str]) -> _Job:
        request = parse_request(fields)
        image = decode_image(request.image, self.config.max_image_pixels)
        settings = apply_request_options(self.config.amg, request.options)
        return _Job(index, image, settings, wants_json(headers))

    def handle(self, requests: Sequence[Tuple[Mapping[str, Any], Mapping[str, str]]]) -> List[Reply]:
        """Answer a batch of requests, each given as (fields, headers); one Reply per request.

        A request that fails gets its own error reply; the others in the batch are still served.
        """
        replies: Dict[int, Reply] = {}
        jobs: List[_Job] = []
        for index, (fields, headers) in enumerate(requests):
            try:
                jobs.append(self._parse(index, fields, headers))
            except ServiceError as error:
                replies[index] = error_reply(error)
        groups: Dict[AmgSettings, List[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.settings, []).append(job)
        for settings, group in groups.items():
            replies.update(self._segment(settings, group))
        return [replies[i] for i in range(len(requests))]

    def _best(self, annotations: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """At most `max_masks` annotations: the best by predicted IoU, in their original order."""
        if len(annotations) <= self.config.max_masks:
            return annotations
        ranked = sorted(range(len(annotations)), key=lambda i: annotations[i]["predicted_iou"], reverse=True)
        return [annotations[i] for i in sorted(ranked[: self.config.max_masks])]

    def _segment(self, settings: AmgSettings, jobs: List[_Job]) -> Dict[int, Reply]:
        try:
            results = self.generator(settings).generate_batch([job.image for job in jobs])
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            logger.error("out of memory segmenting %d image(s)", len(jobs), exc_info=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            error = OutOfMemory("the server ran out of memory for this image; try a smaller image or fewer points")
            return {job.index: error_reply(error) for job in jobs}
        replies = {}
        for job, annotations in zip(jobs, results):
            payload = [annotation_to_builtins(a) for a in self._best(annotations)]
            if job.json:
                replies[job.index] = Reply(200, encode_json(payload), JSON_MEDIA_TYPE)
            else:
                replies[job.index] = Reply(200, encode_pickled(payload), PICKLE_CONTENT_TYPE)
        return replies
