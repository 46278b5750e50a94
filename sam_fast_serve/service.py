"""The mask service: requests (fields, headers) in, replies (status, body, content type, headers)
out, in three steps a TorchServe handler maps onto preprocess -> inference -> postprocess:

    decode  (jobs.py)       each request to a Job, or its 4xx Reply
    predict (engines.py)    each Job to an Answer; automatic jobs with the same settings share
                            image-encoder calls
    encode  (responses.py)  each Answer to its Reply

A request that fails at any step gets its own error Reply and the others of the batch go on; an
engine failure answers exactly the jobs that engine call was running. Imports nothing from ts.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import AmgSettings, load_service_config
from .engines import Engines
from .errors import InternalError, OutOfMemory, ServiceError
from .jobs import Job, decode_job
from .loading import load_engines
from .predictor import FastSamPredictor
from .responses import Reply, error_reply, payload_reply

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """A job's payload (builtins), to be encoded as its job asks."""

    job: Job
    payload: Any


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
    """Validated settings and loaded engines, answering batches of mask requests."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.config = engines.config

    @classmethod
    def load(cls, handler_section: Mapping[str, Any] | None, model_dir: Path, gpu_id: int | None) -> MaskService:
        """Validate the `handler:` section, load and warm up the model from `model_dir`.

        Raises ConfigError naming the offending key or file.
        """
        return cls(load_engines(load_service_config(handler_section), Path(model_dir), gpu_id))

    @property
    def predictor(self) -> FastSamPredictor:
        return self.engines.predictor

    @property
    def dtype(self) -> torch.dtype:
        return self.engines.dtype

    def decode(self, requests: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Job | Reply]:
        """Each request, given as (fields, headers), as a Job or the Reply that refuses it."""
        decoded: list[Job | Reply] = []
        for fields, headers in requests:
            try:
                decoded.append(decode_job(fields, headers, self.config))
            except ServiceError as error:
                decoded.append(error_reply(error))
        return decoded

    def predict(self, decoded: Sequence[Job | Reply]) -> list[Answer | Reply]:
        """Each Job's Answer (Replies pass through). Prompted jobs run one at a time; automatic
        jobs with the same settings run through the engine together."""
        results: dict[int, Answer | Reply] = {i: item for i, item in enumerate(decoded) if isinstance(item, Reply)}
        prompted: list[list[tuple[int, Job]]] = []
        automatic: dict[AmgSettings, list[tuple[int, Job]]] = {}
        for index, item in enumerate(decoded):
            if isinstance(item, Job) and item.settings is None:
                prompted.append([(index, item)])
            elif isinstance(item, Job) and item.settings is not None:
                automatic.setdefault(item.settings, []).append((index, item))
        for group in [*prompted, *automatic.values()]:
            results.update(self._run(group))
        return [results[i] for i in range(len(decoded))]

    def encode(self, predicted: Sequence[Answer | Reply]) -> list[Reply]:
        """Each Answer as the Reply its job asked for (Replies pass through)."""
        replies = []
        for item in predicted:
            if isinstance(item, Answer):
                try:
                    item = payload_reply(item.payload, item.job.json, item.job.image_id)
                except Exception as exc:
                    item = error_reply(as_service_error(exc, 1))
            replies.append(item)
        return replies

    def handle(self, requests: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Reply]:
        """decode -> predict -> encode: one Reply per request."""
        return self.encode(self.predict(self.decode(requests)))

    def _run(self, group: list[tuple[int, Job]]) -> dict[int, Answer | Reply]:
        """The Answers of one engine call for the jobs of `group` (index, job), or the same error
        Reply for all of them when it fails: the other jobs of the batch go on."""
        jobs = [job for _, job in group]
        try:
            payloads = self._automatic(jobs) if jobs[0].settings is not None else self._prompted(jobs)
        except Exception as exc:
            reply = error_reply(as_service_error(exc, len(jobs)))
            return {index: reply for index, _ in group}
        return {index: Answer(job, payload) for (index, job), payload in zip(group, payloads, strict=True)}

    def _automatic(self, jobs: list[Job]) -> list[Any]:
        images = [job.image for job in jobs if job.image is not None]
        assert jobs[0].settings is not None and len(images) == len(jobs)
        return list(self.engines.automatic(images, jobs[0].settings))

    def _prompted(self, jobs: list[Job]) -> list[Any]:
        (job,) = jobs
        assert job.prompt_fields is not None
        return [self.engines.prompted(job.image, job.image_id, job.prompt_fields)]
