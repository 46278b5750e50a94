"""The `handler:` section of model-config.yaml: every key, its default and its valid range.

Each key is one dataclass field whose metadata holds its check, so a key, its default and its rule
are written once. The AMG and image keys are common.options', which also validate per-request
options, so a key means the same thing in the config file and in a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.common.options import (
    AMG_RULES,
    IMAGE_RULES,
    AmgSettings,
    Check,
    ImageSettings,
    boolean,
    check_keys,
    foreign_keys,
    int_in,
    one_of,
    option,
    rules_of,
)
from sam_fast_serve.models.budget import DEFAULT_CHUNK_BYTES
from sam_fast_serve.models.precision import DTYPE_NAMES, INT8
from sam_fast_serve.models.registry import MODEL_TYPES, Family, families_that, model_type
from sam_fast_serve.server.frames import VideoLimits


def _file_name(v: Any) -> str | None:
    if not isinstance(v, str) or not v or "/" in v or "\\" in v or v in (".", ".."):
        return f"must be a file or folder name inside the model archive (no path), got {v!r}"
    return None


def _store(v: Any) -> str | None:
    if v == "memory" or (isinstance(v, str) and v.startswith(("redis://", "rediss://", "unix://"))):
        return None
    return f"must be 'memory' or a Redis URL (redis://host:port/db, rediss://...), got {v!r}"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the mask service needs to load a model and answer requests."""

    model_type: str = option("vit_b", one_of(tuple(MODEL_TYPES)))
    # None means the official checkpoint file name of `model_type`.
    sam_checkpoint: str | None = option(None, _file_name)
    process_batch_size: int = option(4, int_in(1, 64))
    dtype: str = option("auto", one_of(("auto", *DTYPE_NAMES, INT8)))
    compile: bool = option(False, boolean)
    max_image_pixels: int = option(50_000_000, int_in(1, 1_000_000_000))
    # A video request's limits (server/frames.py); pixels a frame: 3840 x 2160.
    max_video_frames: int = option(2000, int_in(1, 1_000_000))
    max_frame_pixels: int = option(3840 * 2160, int_in(1, 1_000_000_000))
    max_video_pixels: int = option(1_000_000_000, int_in(1, 1 << 40))
    max_video_objects: int = option(32, int_in(1, 1024))
    # Masks returned per image at most (the best by predicted IoU): bounds response size.
    max_masks: int = option(1000, int_in(1, 100_000))
    # The largest intermediate of a step, in bytes (models.budget).
    max_chunk_bytes: int = option(DEFAULT_CHUNK_BYTES, int_in(1 << 20, 1 << 40))
    # Longest response body in bytes: keep it at most config.properties' max_response_size, over
    # which TorchServe's frontend drops the worker's connection (the worker dies, its batch is lost).
    max_response_bytes: int = option(64 * 1024 * 1024, int_in(1024, 1 << 40))
    # Image embeddings kept across requests, in bytes (per image in bf16: vit_b 2 MiB, SAM 2 8 MiB); 0 = off.
    embedding_cache_bytes: int = option(256 * 1024 * 1024, int_in(0, 1 << 40))
    # Where embeddings are shared between workers and replicas: "memory" (this worker's cache only)
    # or a Redis URL; its password from the URL or $SAM_FAST_REDIS_PASSWORD.
    embedding_store: str = option("memory", _store)
    # Seconds a Redis entry lives.
    embedding_ttl_s: int = option(3600, int_in(1, 30 * 24 * 3600))
    # Of the model family's settings type (Family.amg_settings), which a request's options replace.
    amg: AmgSettings = field(default_factory=AmgSettings)
    image: ImageSettings = field(default_factory=ImageSettings)

    @property
    def checkpoint_file(self) -> str:
        """The checkpoint's file name in the archive: `sam_checkpoint`, else the official one."""
        return self.sam_checkpoint or model_type(self.model_type).file_name

    @property
    def family(self) -> Family:
        return model_type(self.model_type).family

    @property
    def video_limits(self) -> VideoLimits:
        return VideoLimits(self.max_video_frames, self.max_frame_pixels, self.max_video_pixels)


SERVICE_RULES: dict[str, Check] = rules_of(ServiceConfig)


def load_service_config(handler_section: Mapping[str, Any] | None) -> ServiceConfig:
    """Validate the `handler:` section of model-config.yaml into a ServiceConfig.

    Raises ConfigError naming the first unknown key or bad value.
    """
    section = dict(handler_section or {})
    check_keys(section, {**SERVICE_RULES, **AMG_RULES, **IMAGE_RULES}, ConfigError, "handler")
    model = section.get("model_type", ServiceConfig.model_type)
    family = model_type(model).family
    problem = foreign_keys(section, family.amg_keys, model)
    if problem:
        raise ConfigError(f"handler key(s) {problem}")
    for key, asked, can in (
        ("'dtype' int8", section.get("dtype") == INT8, lambda f: f.int8),
        ("'compile'", bool(section.get("compile")), lambda f: f.compile),
    ):
        if asked and not can(family):
            raise ConfigError(
                f"handler key {key} applies to {families_that(can)} models only, and {model} is {family.title}'s"
            )
    # A family without automatic mask generation refused every AMG key above: it keeps the shared defaults.
    settings = family.amg_settings or AmgSettings
    amg = settings(**{**family.amg_defaults, **{k: section.pop(k) for k in list(section) if k in AMG_RULES}})
    image = ImageSettings(**{k: section.pop(k) for k in list(section) if k in IMAGE_RULES})
    if image.problem():
        raise ConfigError(f"handler keys: {image.problem()}")
    return ServiceConfig(amg=amg, image=image, **section)
