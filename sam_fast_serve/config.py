"""The `handler:` section of model-config.yaml: every key, its default and its valid range.

Each key is one dataclass field whose metadata holds its check, so a key, its default and its rule
are written once. The same rules validate per-request options, so a key means the same thing in
the config file and in a request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import MODEL_TYPES, official_for_model_type
from .errors import ConfigError, InvalidOption
from .intensity import DEFAULT_PERCENTILES, INTENSITY_MODES

Check = Callable[[Any], "str | None"]

# Compute dtypes by their torch names; "auto" picks one per device (build.resolve_dtype).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Not a compute dtype: "auto"'s dtype with the image encoder's linear layers in int8 (x86 CPUs with
# AVX512-VNNI or AMX; build.resolve_precision, quantize.py).
INT8 = "int8"


def _int_in(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"

    return check


def _float_in(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        bracket = "(" if lo_open else "["
        return None if ok else f"must be in {bracket}{lo}, {hi}], got {v}"

    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _file_name(v: Any) -> str | None:
    if not isinstance(v, str) or not v or "/" in v or "\\" in v or v in (".", ".."):
        return f"must be a file name inside the model archive (no directories), got {v!r}"
    return None


def _store(v: Any) -> str | None:
    if v == "memory" or (isinstance(v, str) and v.startswith(("redis://", "rediss://", "unix://"))):
        return None
    return f"must be 'memory' or a Redis URL (redis://host:port/db, rediss://...), got {v!r}"


def _channels(v: Any) -> str | None:
    if v is None or (
        isinstance(v, (list, tuple))
        and len(v) in (1, 3)
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1024 for c in v)
    ):
        return None
    return f"must be a list of one or three channel numbers (from 0), got {v!r}"


def _key(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class AmgSettings:
    """Automatic mask generation settings: the SamAutomaticMaskGenerator arguments a config or a
    request may set, with segment_anything's names and defaults."""

    points_per_side: int = _key(32, _int_in(1, 128))
    points_per_batch: int = _key(64, _int_in(1, 4096))
    pred_iou_thresh: float = _key(0.88, _float_in(0.0, 1.0))
    stability_score_thresh: float = _key(0.95, _float_in(0.0, 1.0))
    box_nms_thresh: float = _key(0.7, _float_in(0.0, 1.0, lo_open=True))
    crop_n_layers: int = _key(0, _int_in(0, 3))
    min_mask_region_area: int = _key(0, _int_in(0, 10_000_000))

    def generator_arguments(self) -> dict[str, Any]:
        """These settings as keyword arguments of SamAutomaticMaskGenerator."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ImageSettings:
    """How an image file becomes the 8-bit RGB that SAM sees (imaging.py): a config or a request may
    set each key."""

    intensity: str = _key("auto", _one_of(INTENSITY_MODES))
    percentile_low: float = _key(DEFAULT_PERCENTILES[0], _float_in(0.0, 100.0))
    percentile_high: float = _key(DEFAULT_PERCENTILES[1], _float_in(0.0, 100.0))
    # The page (TIFF IFD) to segment; an image file of one page has only page 0.
    page: int = _key(0, _int_in(0, 1_000_000))
    # One channel (shown as gray) or three (as R, G, B); None: gray as gray, RGB(A) as RGB, any
    # other count its first channel as gray.
    channels: tuple[int, ...] | None = _key(None, _channels)

    def __post_init__(self) -> None:
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(self.channels))

    @property
    def percentiles(self) -> tuple[float, float]:
        return self.percentile_low, self.percentile_high

    def problem(self) -> str | None:
        """What is wrong with the keys taken together, if anything."""
        if self.percentile_low >= self.percentile_high:
            return f"percentile_low ({self.percentile_low}) must be below percentile_high ({self.percentile_high})"
        return None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the mask service needs to load a model and answer requests."""

    model_type: str = _key("vit_b", _one_of(MODEL_TYPES))
    # None means the official checkpoint file name of `model_type`.
    sam_checkpoint: str | None = _key(None, _file_name)
    process_batch_size: int = _key(4, _int_in(1, 64))
    dtype: str = _key("auto", _one_of(("auto", *DTYPE_NAMES, INT8)))
    compile: bool = _key(False, _boolean)
    max_image_pixels: int = _key(50_000_000, _int_in(1, 1_000_000_000))
    # Masks returned per image at most (the best by predicted IoU): bounds response size.
    max_masks: int = _key(1000, _int_in(1, 100_000))
    # Longest response body in bytes: keep it at most config.properties' max_response_size, over
    # which TorchServe's frontend drops the worker's connection (the worker dies, its batch is lost).
    max_response_bytes: int = _key(64 * 1024 * 1024, _int_in(1024, 1 << 40))
    # Image embeddings kept across requests, in bytes (vit_b: 2 MiB per image in bf16); 0 = off.
    embedding_cache_bytes: int = _key(256 * 1024 * 1024, _int_in(0, 1 << 40))
    # Where embeddings are shared between workers and replicas: "memory" (this worker's cache only)
    # or a Redis URL; its password from the URL or $SAM_FAST_REDIS_PASSWORD.
    embedding_store: str = _key("memory", _store)
    # Seconds a Redis entry lives.
    embedding_ttl_s: int = _key(3600, _int_in(1, 30 * 24 * 3600))
    amg: AmgSettings = field(default_factory=AmgSettings)
    image: ImageSettings = field(default_factory=ImageSettings)

    @property
    def checkpoint_file(self) -> str:
        """The checkpoint's file name in the archive: `sam_checkpoint`, else the official one."""
        return self.sam_checkpoint or official_for_model_type(self.model_type).file_name


def _rules(cls: type) -> dict[str, Check]:
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


AMG_RULES: dict[str, Check] = _rules(AmgSettings)
IMAGE_RULES: dict[str, Check] = _rules(ImageSettings)
SERVICE_RULES: dict[str, Check] = _rules(ServiceConfig)


def _check_keys(
    values: Mapping[str, Any],
    rules: Mapping[str, Check],
    error: Callable[[str], Exception],
    where: str,
) -> None:
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise error(f"unknown {where} key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(rules))}")
    for key, value in values.items():
        problem = rules[key](value)
        if problem:
            raise error(f"{where} key {key!r} {problem}")


def load_service_config(handler_section: Mapping[str, Any] | None) -> ServiceConfig:
    """Validate the `handler:` section of model-config.yaml into a ServiceConfig.

    Raises ConfigError naming the first unknown key or bad value.
    """
    section = dict(handler_section or {})
    _check_keys(section, {**SERVICE_RULES, **AMG_RULES, **IMAGE_RULES}, ConfigError, "handler")
    amg = AmgSettings(**{k: section.pop(k) for k in list(section) if k in AMG_RULES})
    image = ImageSettings(**{k: section.pop(k) for k in list(section) if k in IMAGE_RULES})
    if image.problem():
        raise ConfigError(f"handler keys: {image.problem()}")
    return ServiceConfig(amg=amg, image=image, **section)


def apply_request_options(amg: AmgSettings, options: Mapping[str, Any]) -> AmgSettings:
    """The AMG settings for one request: `amg` with the request's options applied.

    Raises InvalidOption (HTTP 422) naming an unknown option or a value out of range.
    """
    _check_keys(options, AMG_RULES, InvalidOption, "request option")
    return dataclasses.replace(amg, **options)


def apply_image_options(image: ImageSettings, options: Mapping[str, Any]) -> ImageSettings:
    """The image settings for one request: `image` with the request's options applied.

    Raises InvalidOption (HTTP 422) naming an unknown option, a value out of range, or a bad pair.
    """
    _check_keys(options, IMAGE_RULES, InvalidOption, "request option")
    settings = dataclasses.replace(image, **options)
    if settings.problem():
        raise InvalidOption(f"request options: {settings.problem()}")
    return settings
