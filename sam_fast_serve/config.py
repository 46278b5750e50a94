"""The `handler:` section of model-config.yaml: every key, its default and its valid range.

The same rules validate per-request options, so a key means the same thing in the config file and
in a request.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import ConfigError, InvalidOption

MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AmgSettings:
    """Automatic mask generation settings (same names and defaults as segment_anything's AMG)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the mask service needs to load a model and answer requests."""

    model_type: str = "vit_b"
    # None means the official checkpoint file name of `model_type`.
    sam_checkpoint: Optional[str] = None
    process_batch_size: int = 4
    dtype: str = "auto"
    compile: bool = False
    max_image_pixels: int = 50_000_000
    # Masks returned per image at most (the best by predicted IoU): bounds response size.
    max_masks: int = 1000
    # Image embeddings kept across requests, in bytes (vit_b: 2 MiB per image in bf16); 0 = off.
    embedding_cache_bytes: int = 256 * 1024 * 1024
    amg: AmgSettings = field(default_factory=AmgSettings)


def _int_in(lo: int, hi: int) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"

    return check


def _float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        bracket = "(" if lo_open else "["
        return None if ok else f"must be in {bracket}{lo}, {hi}], got {v}"

    return check


def _one_of(choices: Tuple[str, ...]) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


def _boolean(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _file_name(v: Any) -> Optional[str]:
    if not isinstance(v, str) or not v or "/" in v or "\\" in v or v in (".", ".."):
        return f"must be a file name inside the model archive (no directories), got {v!r}"
    return None


AMG_RULES: Dict[str, Callable[[Any], Optional[str]]] = {
    "points_per_side": _int_in(1, 128),
    "points_per_batch": _int_in(1, 4096),
    "pred_iou_thresh": _float_in(0.0, 1.0),
    "stability_score_thresh": _float_in(0.0, 1.0),
    "box_nms_thresh": _float_in(0.0, 1.0, lo_open=True),
    "crop_n_layers": _int_in(0, 3),
    "min_mask_region_area": _int_in(0, 10_000_000),
}

SERVICE_RULES: Dict[str, Callable[[Any], Optional[str]]] = {
    "model_type": _one_of(MODEL_TYPES),
    "sam_checkpoint": _file_name,
    "process_batch_size": _int_in(1, 64),
    "dtype": _one_of(DTYPES),
    "compile": _boolean,
    "max_image_pixels": _int_in(1, 1_000_000_000),
    "max_masks": _int_in(1, 100_000),
    "embedding_cache_bytes": _int_in(0, 1 << 40),
}


def _check_keys(
    values: Mapping[str, Any],
    rules: Mapping[str, Callable[[Any], Optional[str]]],
    error: Callable[[str], Exception],
    where: str,
) -> None:
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise error(
            f"unknown {where} key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(sorted(rules))}"
        )
    for key, value in values.items():
        problem = rules[key](value)
        if problem:
            raise error(f"{where} key {key!r} {problem}")


def load_service_config(handler_section: Optional[Mapping[str, Any]]) -> ServiceConfig:
    """Validate the `handler:` section of model-config.yaml into a ServiceConfig.

    Raises ConfigError naming the first unknown key or bad value.
    """
    section = dict(handler_section or {})
    _check_keys(section, {**SERVICE_RULES, **AMG_RULES}, ConfigError, "handler")
    amg = AmgSettings(**{k: section.pop(k) for k in list(section) if k in AMG_RULES})
    return ServiceConfig(amg=amg, **section)


def apply_request_options(amg: AmgSettings, options: Mapping[str, Any]) -> AmgSettings:
    """The AMG settings for one request: `amg` with the request's options applied.

    Raises InvalidOption (HTTP 422) naming an unknown option or a value out of range.
    """
    _check_keys(options, AMG_RULES, InvalidOption, "request option")
    return dataclasses.replace(amg, **options)
