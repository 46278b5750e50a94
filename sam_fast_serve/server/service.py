"""The mask service: requests (fields, headers) in, replies (status, body, content type, headers)
out, in three steps a TorchServe handler maps onto preprocess -> inference -> postprocess:

    decode  (jobs.py)       each request to a Job, or its 4xx Reply; its answer format is
                            chosen here, once, from the Accept header (formats.py)
    predict (models.engine) each Job to an Answer; automatic jobs with the same settings share
                            image-encoder calls
    encode  (responses.py)  each Answer to its Reply, the body written by the job's format

A video request (a TrackJob) is answered a line at a time (common.tracks): what it tracks, then a
line a frame as each is tracked, each handed to the `stream` predict is given (the handler sends
each as a TorchServe intermediate response), else gathered into its reply; the reply's last line
is the summary.

A request that fails at any step gets its own error Reply and the others of the batch go on; an
engine failure answers exactly the jobs that engine call was running. Every step reports what it
measured to the service's Recorder (metrics.py). Imports nothing from ts.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sam_fast_serve.common.errors import BadRequest, InternalError, InvalidOption, OutOfMemory, ServiceError
from sam_fast_serve.common.options import AmgSettings
from sam_fast_serve.common.tracks import TrackRequest
from sam_fast_serve.models.budget import set_chunk_bytes
from sam_fast_serve.models.engine import Engine, Segmented
from sam_fast_serve.server.config import ServiceConfig, load_service_config
from sam_fast_serve.server.formats import Body
from sam_fast_serve.server.jobs import Job, TrackJob, decode_job
from sam_fast_serve.server.loading import load_engine
from sam_fast_serve.server.metrics import ANSWERS, IMAGE_MEGAPIXELS, IMAGES, MASKS, Recorder, Sink, discard
from sam_fast_serve.server.responses import Reply, error_reply, payload_reply
from sam_fast_serve.server.runtime import keep_freed_memory

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """A job's result, to be written in its job's answer format."""

    job: Job
    result: Segmented


@dataclass
class Tracked:
    """A video job's result: the lines not streamed (all of them without a stream) and the summary
    record that ends the answer."""

    job: TrackJob
    lines: list[Body]
    summary: dict[str, Any]


# (request index, one line of its answer, the answer's content type): where predict streams.
Stream = Callable[[int, Body, str], None]


def _is_out_of_memory(exc: BaseException) -> bool:
    # CPU allocation failures surface as RuntimeError from the default allocator.
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def as_service_error(exc: Exception, requests: int) -> ServiceError:
    """The ServiceError to answer `requests` request(s) with after `exc`; unexpected failures are
    logged with their traceback, and memory is freed after any of them."""
    if isinstance(exc, ServiceError):
        return exc
    if _is_out_of_memory(exc):
        logger.error("out of memory serving %d request(s)", requests, exc_info=True)
        failure: ServiceError = OutOfMemory(
            "the server ran out of memory for this request; try a smaller image or fewer points"
        )
    else:
        logger.exception("unexpected failure serving %d request(s)", requests)
        failure = InternalError(f"unexpected {type(exc).__name__} while segmenting; see the worker log")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return failure


class MaskService:
    """A validated config and a loaded engine, answering batches of mask requests."""

    def __init__(self, config: ServiceConfig, engine: Engine, sink: Sink = discard) -> None:
        self.config = config
        self.engine = engine
        self.recorder = Recorder(sink)
        self.recorder.start()

    @classmethod
    def load(
        cls, handler_section: Mapping[str, Any] | None, model_dir: Path, gpu_id: int | None, sink: Sink = discard
    ) -> MaskService:
        """Validate the `handler:` section, load and warm up the model from `model_dir`; metrics go
        to `sink`. The process keeps freed memory from then on (runtime.keep_freed_memory): the
        decoder's large activations are reused instead of page-faulted in at every allocation; its
        steps hold at most `max_chunk_bytes` an intermediate (models.budget).

        Raises ConfigError naming the offending key or file.
        """
        keep_freed_memory()
        config = load_service_config(handler_section)
        set_chunk_bytes(config.max_chunk_bytes)
        return cls(config, load_engine(config, Path(model_dir), gpu_id), sink)

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def decode(self, requests: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Job | TrackJob | Reply]:
        """Each request, given as (fields, headers), as a Job or the Reply that refuses it."""
        decoded: list[Job | TrackJob | Reply] = []
        for fields, headers in requests:
            start = time.perf_counter()
            try:
                job = decode_job(fields, headers, self.config)
                if isinstance(job, Job) and job.mode in self.engine.unserved:
                    raise BadRequest(self.engine.unserved[job.mode])
            except ServiceError as error:
                decoded.append(error_reply(error))
            else:
                decoded.append(job)
                if isinstance(job, Job) and job.image is not None:
                    self.recorder.emit(IMAGE_MEGAPIXELS, job.image.shape[0] * job.image.shape[1] / 1e6)
            self.recorder.stages({"decode": time.perf_counter() - start})
        return decoded

    def predict(
        self, decoded: Sequence[Job | TrackJob | Reply], stream: Stream | None = None
    ) -> list[Answer | Tracked | Reply]:
        """Each Job's Answer and each TrackJob's Tracked (Replies pass through). Prompted, concept
        and video jobs run one at a time; automatic jobs with the same settings run through the
        engine together. A video job's lines go to `stream` as they are made, when given."""
        results: dict[int, Answer | Tracked | Reply] = {
            i: item for i, item in enumerate(decoded) if isinstance(item, Reply)
        }
        for index, item in enumerate(decoded):
            if isinstance(item, TrackJob):
                results[index] = self._track(index, item, stream)
        alone: list[list[tuple[int, Job]]] = []
        automatic: dict[AmgSettings, list[tuple[int, Job]]] = {}
        for index, item in enumerate(decoded):
            if isinstance(item, Job) and item.settings is None:
                alone.append([(index, item)])
            elif isinstance(item, Job) and item.settings is not None:
                automatic.setdefault(item.settings, []).append((index, item))
        for group in [*alone, *automatic.values()]:
            results.update(self._run(group))
        self.recorder.store_counts(self.engine.store.counts)
        return [results[i] for i in range(len(decoded))]

    def encode(self, predicted: Sequence[Answer | Tracked | Reply]) -> list[Reply]:
        """Each Answer as the Reply its job asked for (Replies pass through)."""
        replies = []
        for item in predicted:
            if isinstance(item, Answer):
                reply = self._encode(item)
            elif isinstance(item, Tracked):
                reply = self._encode_tracked(item)
            else:
                reply = item
            self.recorder.emit(ANSWERS, 1, status=str(reply.status))
            replies.append(reply)
        return replies

    def _encode(self, answer: Answer) -> Reply:
        start = time.perf_counter()
        try:
            job = answer.job
            size = answer.result.size if job.image is None else job.image.shape[:2]
            body = job.body(answer.result.payload, size)
            reply = payload_reply(body, job.answer_format.content_type, job.image_id, self.config.max_response_bytes)
        except Exception as exc:
            return error_reply(as_service_error(exc, 1))
        mode = answer.job.mode
        self.recorder.stages({**answer.result.seconds, "wire_encode": time.perf_counter() - start})
        self.recorder.emit(IMAGES, 1, mode=mode)
        self.recorder.emit(MASKS, answer.result.masks, mode=mode)
        return reply

    def _encode_tracked(self, tracked: Tracked) -> Reply:
        job = tracked.job
        try:
            body = "".join([*map(str, tracked.lines), str(job.line(tracked.summary))])
            return payload_reply(body, job.answer_format.content_type, None, self.config.max_response_bytes)
        except Exception as exc:
            return error_reply(as_service_error(exc, 1))

    def handle(
        self, requests: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], stream: Stream | None = None
    ) -> list[Reply]:
        """decode -> predict -> encode: one Reply per request."""
        return self.encode(self.predict(self.decode(requests), stream))

    def _track(self, index: int, job: TrackJob, stream: Stream | None) -> Tracked | Reply:
        """Track job's objects, a line a frame to `stream` (or kept); the job's frames are closed
        at the end, and the tracker's state with them, whatever happens."""
        lines: list[Body] = []

        def send(record: dict[str, Any]) -> None:
            line = job.line(record)
            if stream is not None:
                stream(index, line, job.answer_format.content_type)
            else:
                lines.append(line)

        frames = 0
        start = time.perf_counter()
        try:
            with contextlib.ExitStack() as ending:
                ending.enter_context(job.resources)
                request = self._objects(job)
                objects = sorted({prompt.object for prompt in request.prompts})
                run = ending.enter_context(contextlib.closing(self.engine.track(job.frames, len(job.frames), request)))
                send({"frames": len(job.frames), "objects": objects})
                for i, records in run:
                    send({"frame": job.request.frames[i], "objects": records})
                    frames += 1
        except Exception as exc:
            return error_reply(as_service_error(exc, 1))
        self.recorder.stages({"track": time.perf_counter() - start})
        return Tracked(job, lines, {"done": True, "frames": frames, "objects": objects})

    def _objects(self, job: TrackJob) -> TrackRequest:
        """The job's request with its objects: its prompts, or the masks automatic mask generation
        keeps on its frame (the best max_video_objects); InvalidOption when it keeps none."""
        request = job.request
        if job.settings is None:
            return request
        assert request.automatic is not None
        (found,) = self.engine.automatic([job.frames(request.automatic)], job.settings)
        records = keep_best(found.payload, self.config.max_video_objects)
        if not records:
            raise InvalidOption(
                f"automatic mask generation kept no mask on frame {request.frames[request.automatic]}: lower "
                "pred_iou_thresh or stability_score_thresh, or give prompts"
            )
        return request.with_masks([record["segmentation"] for record in records])

    def _run(self, group: list[tuple[int, Job]]) -> dict[int, Answer | Reply]:
        """The Answers of one engine call for the jobs of `group` (index, job), or the same error
        Reply for all of them when it fails: the other jobs of the batch go on."""
        jobs = [job for _, job in group]
        try:
            results = self._automatic(jobs) if jobs[0].settings is not None else self._alone(jobs)
        except Exception as exc:
            reply = error_reply(as_service_error(exc, len(jobs)))
            return {index: reply for index, _ in group}
        return {index: Answer(job, result) for (index, job), result in zip(group, results, strict=True)}

    def _automatic(self, jobs: list[Job]) -> list[Segmented]:
        images = [job.image for job in jobs if job.image is not None]
        assert jobs[0].settings is not None and len(images) == len(jobs)
        results = self.engine.automatic(images, jobs[0].settings)
        for result in results:
            result.payload = keep_best(result.payload, self.config.max_masks)
            result.masks = len(result.payload)
        return results

    def _alone(self, jobs: list[Job]) -> list[Segmented]:
        (job,) = jobs
        if job.prompt_fields is not None:
            return [self.engine.prompted(job.image, job.image_id, job.prompt_fields)]
        assert job.concept_fields is not None
        return [self.engine.concepts(job.image, job.image_id, job.concept_fields, self.config.max_masks)]


def keep_best(records: list[dict[str, Any]], max_masks: int) -> list[dict[str, Any]]:
    """At most `max_masks` records: the best by predicted IoU, in their original order."""
    if len(records) <= max_masks:
        return records
    ranked = sorted(range(len(records)), key=lambda i: records[i]["predicted_iou"], reverse=True)
    return [records[i] for i in sorted(ranked[:max_masks])]
