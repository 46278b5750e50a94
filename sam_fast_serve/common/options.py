"""The options of automatic mask generation and of image decoding: every key, its default and its
valid range, shared by the server (config file and requests) and the client (its command line).

Each key is one dataclass field whose metadata holds its check, so a key, its default and its rule
are written once. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sam_fast_serve.common.errors import InvalidOption
from sam_fast_serve.common.intensity import DEFAULT_PERCENTILES, INTENSITY_MODES

Check = Callable[[Any], "str | None"]


def int_in(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"

    return check


def float_in(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        bracket = "(" if lo_open else "["
        return None if ok else f"must be in {bracket}{lo}, {hi}], got {v}"

    return check


def one_of(choices: tuple[str, ...]) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _channels(v: Any) -> str | None:
    if v is None or (
        isinstance(v, (list, tuple))
        and len(v) in (1, 3)
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1024 for c in v)
    ):
        return None
    return f"must be a list of one or three channel numbers (from 0), got {v!r}"


def option(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class AmgSettings:
    """Automatic mask generation settings: the generator arguments a config or a request may set,
    with segment_anything's names and defaults. A model family takes the keys it knows
    (models.registry.Family.amg_keys) and may change a default (Family.amg_defaults)."""

    points_per_side: int = option(32, int_in(1, 128))
    points_per_batch: int = option(64, int_in(1, 4096))
    pred_iou_thresh: float = option(0.88, float_in(0.0, 1.0))
    stability_score_thresh: float = option(0.95, float_in(0.0, 1.0))
    box_nms_thresh: float = option(0.7, float_in(0.0, 1.0, lo_open=True))
    crop_n_layers: int = option(0, int_in(0, 3))
    min_mask_region_area: int = option(0, int_in(0, 10_000_000))
    # SAM 2 only (SAM2AutomaticMaskGenerator's): refine each mask with its own low-res logits as a
    # mask prompt, and ask the decoder for three masks per point (else one).
    use_m2m: bool = option(False, boolean)
    multimask_output: bool = option(True, boolean)

    def generator_arguments(self, keys: Iterable[str]) -> dict[str, Any]:
        """The settings named by `keys` as keyword arguments of a generator."""
        values = dataclasses.asdict(self)
        return {key: values[key] for key in keys}


@dataclass(frozen=True)
class ImageSettings:
    """How an image file becomes the 8-bit RGB that SAM sees (server/imaging.py): a config or a request may
    set each key."""

    intensity: str = option("auto", one_of(INTENSITY_MODES))
    percentile_low: float = option(DEFAULT_PERCENTILES[0], float_in(0.0, 100.0))
    percentile_high: float = option(DEFAULT_PERCENTILES[1], float_in(0.0, 100.0))
    # The page (TIFF IFD) to segment; an image file of one page has only page 0.
    page: int = option(0, int_in(0, 1_000_000))
    # One channel (shown as gray) or three (as R, G, B); None: gray as gray, RGB(A) as RGB, any
    # other count its first channel as gray.
    channels: tuple[int, ...] | None = option(None, _channels)

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


def rules_of(cls: type) -> dict[str, Check]:
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


AMG_RULES: dict[str, Check] = rules_of(AmgSettings)
IMAGE_RULES: dict[str, Check] = rules_of(ImageSettings)


def check_keys(
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


def foreign_keys(values: Iterable[str], known: Iterable[str], model: str) -> str | None:
    """What is wrong with AMG keys `values` that `model` does not take (`known` are the ones it
    takes), if any: the message names each key and the model."""
    foreign = sorted(set(values) & set(AMG_RULES) - set(known))
    if not foreign:
        return None
    return f"{', '.join(map(repr, foreign))} do(es) not apply to {model}; its automatic options: {', '.join(sorted(known))}"


def apply_request_options(
    amg: AmgSettings, options: Mapping[str, Any], known: Iterable[str], model: str
) -> AmgSettings:
    """The AMG settings for one request: `amg` with the request's options applied; `known` are the
    AMG keys the model (named `model`) takes.

    Raises InvalidOption (HTTP 422) naming an unknown option, one the model does not take, or a
    value out of range.
    """
    check_keys(options, AMG_RULES, InvalidOption, "request option")
    problem = foreign_keys(options, known, model)
    if problem:
        raise InvalidOption(f"request option(s) {problem}")
    return dataclasses.replace(amg, **options)


def apply_image_options(image: ImageSettings, options: Mapping[str, Any]) -> ImageSettings:
    """The image settings for one request: `image` with the request's options applied.

    Raises InvalidOption (HTTP 422) naming an unknown option, a value out of range, or a bad pair.
    """
    check_keys(options, IMAGE_RULES, InvalidOption, "request option")
    settings = dataclasses.replace(image, **options)
    if settings.problem():
        raise InvalidOption(f"request options: {settings.problem()}")
    return settings
