"""The service's metrics: the one table that names them, and the recorder the service reports to.

The service measures; a `Sink` publishes. The TorchServe handler's sink hands each observation to
TorchServe's metrics API, which exports it on the metrics port in Prometheus format (the shipped
config.properties sets `metrics_mode=prometheus` and lets the frontend learn these names from the
worker). Imports nothing from ts or torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sam_fast_serve.models.timing import ENGINE_STAGES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """One exported metric: its Prometheus name, type ("counter" or "histogram"), the unit TorchServe
    records, its own labels (TorchServe adds ModelName, Level and Hostname) and what it means."""

    name: str
    kind: str
    unit: str
    labels: tuple[str, ...]
    meaning: str


# Stages of a request, in order: decode once per request, the engine's once per answered image,
# wire once per answer.
STAGES = ("decode", *ENGINE_STAGES, "wire_encode")
MODES = ("automatic", "prompted", "concepts")
TIERS = ("local", "shared")

STAGE_SECONDS = Metric(
    "sam_stage_seconds",
    "histogram",
    "s",
    ("stage",),
    "Seconds per request in each stage: decode (request and image), embedding_store (lookups and "
    "writes), image_encoder, mask_decoder, postprocess (upsampling, stability, NMS, RLE), wire_encode "
    "(response body). A batched encoder call is shared evenly by its images.",
)
IMAGE_MEGAPIXELS = Metric(
    "sam_image_megapixels", "histogram", "megapixels", (), "Size of each decoded image (width x height / 10^6)."
)
IMAGES = Metric(
    "sam_images_total",
    "counter",
    "count",
    ("mode",),
    "Images answered with masks: automatic (one per image) or prompted (one per request).",
)
MASKS = Metric(
    "sam_masks_total",
    "counter",
    "count",
    ("mode",),
    "Masks returned; divided by sam_images_total it is masks per image.",
)
ANSWERS = Metric("sam_answers_total", "counter", "count", ("status",), "Answers by HTTP status, errors included.")
STORE_LOOKUPS = Metric(
    "sam_embedding_lookups_total",
    "counter",
    "count",
    ("tier", "result"),
    "Embedding lookups by tier (local: this worker's LRU; shared: Redis, asked after a local miss) "
    "and result (hit, miss).",
)
STORE_ERRORS = Metric(
    "sam_embedding_store_errors_total",
    "counter",
    "count",
    (),
    "Reads and writes the shared store (Redis) did not answer in time: skipped, or 503 for an image_id.",
)
METRICS = (STAGE_SECONDS, IMAGE_MEGAPIXELS, IMAGES, MASKS, ANSWERS, STORE_LOOKUPS, STORE_ERRORS)

# TorchServe's own metrics that the dashboard reads (its frontend's carry their own labels).
TORCHSERVE_METRICS = (
    Metric("HandlerTime", "gauge", "ms", (), "Milliseconds the last batch spent in the handler (TorchServe's)."),
    Metric(
        "ts_inference_requests_total",
        "counter",
        "count",
        ("model_name", "model_version", "hostname"),
        "Inference requests received (TorchServe's frontend).",
    ),
    Metric(
        "ts_inference_latency_microseconds",
        "counter",
        "us",
        ("model_name", "model_version", "hostname"),
        "Total microseconds of whole requests, queue included (TorchServe's frontend).",
    ),
    Metric(
        "ts_queue_latency_microseconds",
        "counter",
        "us",
        ("model_name", "model_version", "hostname"),
        "Total microseconds requests waited in the queue (TorchServe's frontend).",
    ),
)

# (metric, value, labels) -> published; labels are the metric's own, by name.
Sink = Callable[[Metric, float, Mapping[str, str]], None]


def discard(metric: Metric, value: float, labels: Mapping[str, str]) -> None:
    """The sink of a service nobody watches (tests, benchmarks, tools)."""


class Recorder:
    """Observations for a `Sink`. A failing sink is logged and never fails a request."""

    def __init__(self, sink: Sink = discard) -> None:
        self.sink = sink
        self._store_counts: Counter[str] = Counter()

    def emit(self, metric: Metric, value: float, **labels: str) -> None:
        try:
            self.sink(metric, value, labels)
        except Exception:
            logger.exception("could not record metric %s", metric.name)

    def start(self) -> None:
        """Publish every counter series known in advance at 0, so that rates exist from the start."""
        for mode in MODES:
            self.emit(IMAGES, 0, mode=mode)
            self.emit(MASKS, 0, mode=mode)
        for tier in TIERS:
            for result in ("hit", "miss"):
                self.emit(STORE_LOOKUPS, 0, tier=tier, result=result)
        self.emit(STORE_ERRORS, 0)

    def stages(self, seconds: Mapping[str, float]) -> None:
        for stage, value in seconds.items():
            self.emit(STAGE_SECONDS, value, stage=stage)

    def store_counts(self, counts: Counter[str]) -> None:
        """Publish what `counts` (an EmbeddingStore's running totals) gained since the last call."""
        gained = counts - self._store_counts
        self._store_counts = counts.copy()
        for name, value in gained.items():
            if name == "shared_error":
                self.emit(STORE_ERRORS, value)
            else:
                tier, result = name.split("_")
                self.emit(STORE_LOOKUPS, value, tier=tier, result=result)
