"""The mask service: request fields in, replies (status, body, content type, headers) out.
Imports nothing from ts.

Data flows one way: parse_request -> decode_image -> engine (SamAutomaticMaskGenerator, or
segment_prompts when the request has points or boxes) -> wire encoding.
"""

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .automatic import SamAutomaticMaskGenerator
from .build import prepare_model, resolve_dtype, sam_model_fast_registry, select_device
from .checkpoints import official_for_model_type, resolve_checkpoint
from .config import AmgSettings, ServiceConfig, apply_request_options, load_service_config
from .embeddings import EmbeddingCache, pixel_key
from .errors import BadRequest, InternalError, InvalidOption, NotFound, OutOfMemory, ServiceError
from .fast_decoder import FastMaskDecoder
from .imaging import decode_image
from .payload import parse_request
from .predictor import FastSamPredictor
from .prompted import segment_prompts
from .prompts import has_prompts, parse_prompts, split_prompt_fields
from .wire import JSON_MEDIA_TYPE, annotation_to_builtins, encode_json, encode_pickled

logger = logging.getLogger(__name__)

PICKLE_CONTENT_TYPE = "text/plain; charset=us-ascii"
# Every 200 carries the image's embedding-cache key: send it back as "image_id" with prompts.
IMAGE_ID_HEADER = "X-Image-Id"


@dataclass
class Reply:
    """One response: HTTP status, body text, its content type and extra headers."""

    status: int
    body: str
    content_type: str
    headers: Dict[str, str] = field(default_factory=dict)


def error_reply(error: ServiceError) -> Reply:
    return Reply(error.status, encode_json(error.to_body()), JSON_MEDIA_TYPE)


def payload_reply(payload: Any, as_json: bool, image_id: str) -> Reply:
    """A 200 carrying `payload` (builtins) as JSON or pickle+zlib+base64, and the image's cache key."""
    headers = {IMAGE_ID_HEADER: image_id}
    if as_json:
        return Reply(200, encode_json(payload), JSON_MEDIA_TYPE, headers)
    return Reply(200, encode_pickled(payload), PICKLE_CONTENT_TYPE, headers)


def wants_json(headers: Mapping[str, str]) -> bool:
    """Whether the client's Accept header asks for JSON (header names compared case-insensitively)."""
    accept = next((v for k, v in headers.items() if k.lower() == "accept" and isinstance(v, str)), "")
    return "application/json" in accept.lower()


def _is_out_of_memory(exc: BaseException) -> bool:
    # CPU allocation failures surface as RuntimeError from the default allocator.
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Job:
    """One parsed request: automatic (settings) or prompted (prompt_fields)."""

    index: int
    json: bool
    image: Optional[np.ndarray]  # None when the request names a cached image by image_id
    image_id: str
    settings: Optional[AmgSettings] = None
    prompt_fields: Optional[Dict[str, Any]] = None


class MaskService:
    """A loaded SAM model and the settings to answer mask requests with it."""

    def __init__(self, config: ServiceConfig, sam: torch.nn.Module, dtype: torch.dtype) -> None:
        self.config = config
        self.sam = sam
        self.dtype = dtype
        decoder = FastMaskDecoder(sam.mask_decoder, dtype)
        self.predictor = FastSamPredictor(sam, decoder, EmbeddingCache(config.embedding_cache_bytes))

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
        loaded = time.perf_counter()
        service.warm_up()
        logger.info(
            "loaded %s from %s on %s in %s in %.1f s, warmed up in %.1f s",
            config.model_type, file_name, device, dtype, loaded - started, time.perf_counter() - loaded,
        )
        return service

    def warm_up(self) -> None:
        """Run one small image through every stage (encoder, decoder, masks) at load, so that kernel
        selection, first-touch allocations and, with `compile`, compilation are not paid by a request."""
        image = np.zeros((64, 64, 3), dtype=np.uint8)
        settings = AmgSettings(points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        self.generator(settings).generate(image)

    def generator(self, settings: AmgSettings) -> SamAutomaticMaskGenerator:
        """A generator for one set of AMG settings, sharing this service's predictor and cache."""
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
            predictor=self.predictor,
        )

    def _parse(self, index: int, fields: Mapping[str, Any], headers: Mapping[str, str]) -> _Job:
        request = parse_request(fields)
        options = dict(request.options)
        image_id = options.pop("image_id", None)
        prompt_fields = split_prompt_fields(options)
        as_json = wants_json(headers)
        image = None
        if request.image is not None:
            image = decode_image(request.image, self.config.max_image_pixels)
            image_id = pixel_key(image)
        elif not isinstance(image_id, str) or not image_id:
            raise BadRequest("'image_id' must be the string an earlier response returned")
        if has_prompts(prompt_fields):
            if options:
                raise InvalidOption(
                    f"option(s) {', '.join(map(repr, sorted(options)))} apply to automatic mask generation, "
                    "not to a request with points or boxes"
                )
            if image is not None:
                parse_prompts(prompt_fields, image.shape[:2])  # refuse bad prompts before the encoder runs
            return _Job(index, as_json, image, image_id, prompt_fields=prompt_fields)
        if prompt_fields:
            raise InvalidOption(f"{', '.join(map(repr, sorted(prompt_fields)))} given without 'points' or 'boxes'")
        if image is None:
            raise BadRequest("automatic mask generation needs the image itself; 'image_id' works with points or boxes")
        return _Job(index, as_json, image, image_id, settings=apply_request_options(self.config.amg, options))

    def handle(self, requests: Sequence[Tuple[Mapping[str, Any], Mapping[str, str]]]) -> List[Reply]:
        """Answer a batch of requests, each given as (fields, headers); one Reply per request.

        A request that fails gets its own error reply; the others in the batch are still served.
        Automatic requests with the same settings share image-encoder calls.
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
            if job.settings is not None:
                groups.setdefault(job.settings, []).append(job)
            else:
                replies[job.index] = self._guarded([job], self._prompted)[job.index]
        for group in groups.values():
            replies.update(self._guarded(group, self._automatic))
        return [replies[i] for i in range(len(requests))]

    def _guarded(self, jobs: List[_Job], run: Callable[[List[_Job]], Dict[int, Reply]]) -> Dict[int, Reply]:
        """`run(jobs)`, with any failure answered per job (the other jobs of the batch go on)."""
        try:
            return run(jobs)
        except ServiceError as error:
            failure: ServiceError = error
        except Exception as exc:
            if _is_out_of_memory(exc):
                logger.error("out of memory serving %d request(s)", len(jobs), exc_info=True)
                failure = OutOfMemory("the server ran out of memory for this request; try a smaller image or fewer points")
            else:
                logger.exception("unexpected failure serving %d request(s)", len(jobs))
                failure = InternalError(f"unexpected {type(exc).__name__} while segmenting; see the worker log")
            _free_memory()
        return {job.index: error_reply(failure) for job in jobs}

    def _automatic(self, jobs: List[_Job]) -> Dict[int, Reply]:
        settings = jobs[0].settings
        results = self.generator(settings).generate_batch([job.image for job in jobs])
        return {
            job.index: payload_reply([annotation_to_builtins(a) for a in self._best(anns)], job.json, job.image_id)
            for job, anns in zip(jobs, results)
        }

    def _prompted(self, jobs: List[_Job]) -> Dict[int, Reply]:
        (job,) = jobs
        if job.image is not None:
            self.predictor.set_image(job.image)
        else:
            embedding = self.predictor.cache.get(job.image_id)
            if embedding is None:
                raise NotFound(
                    f"image_id {job.image_id!r} is not in the embedding cache (evicted, or from another "
                    "worker or server run): send the image again"
                )
            self.predictor.set_embedding(embedding)
        prompts = parse_prompts(job.prompt_fields, self.predictor.original_size)
        payload = {"image_id": job.image_id, "prompts": segment_prompts(self.predictor, prompts)}
        return {job.index: payload_reply(payload, job.json, job.image_id)}

    def _best(self, annotations: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """At most `max_masks` annotations: the best by predicted IoU, in their original order."""
        if len(annotations) <= self.config.max_masks:
            return annotations
        ranked = sorted(range(len(annotations)), key=lambda i: annotations[i]["predicted_iou"], reverse=True)
        return [annotations[i] for i in sorted(ranked[: self.config.max_masks])]
