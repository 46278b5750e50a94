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


def option(default: Any, check: Check, help: str = "") -> Any:
    """A dataclass field with its default, its check and (for the client's command line and docs) its help line."""
    return field(default=default, metadata={"check": check, "help": help})


@dataclass(frozen=True)
class AmgSettings:
    """Automatic mask generation settings: the generator arguments a config or a request may set,
    with segment_anything's names and defaults; every automatic family takes these keys. A family
    whose generator takes more has a subclass with them (models.registry.Family.amg_settings), and
    may change a default (Family.amg_defaults)."""

    points_per_side: int = option(
        32, int_in(1, 128), "points per side of the grid of point prompts (more finds smaller objects, slower)"
    )
    points_per_batch: int = option(
        64, int_in(1, 4096), "grid points the mask decoder takes at once (memory and speed, not the answer)"
    )
    pred_iou_thresh: float = option(0.88, float_in(0.0, 1.0), "keep the masks whose predicted IoU is at least this")
    stability_score_thresh: float = option(
        0.95, float_in(0.0, 1.0), "keep the masks whose stability score is at least this"
    )
    box_nms_thresh: float = option(
        0.7,
        float_in(0.0, 1.0, lo_open=True),
        "of two masks whose boxes overlap by more IoU than this, drop the lower scored (1: keep all)",
    )
    crop_n_layers: int = option(0, int_in(0, 3), "layers of image crops segmented again (0: the whole image only)")
    min_mask_region_area: int = option(
        0,
        int_in(0, 10_000_000),
        "remove holes and islands smaller than this many pixels (0: none; SAM 2: in the low-res logits, as SAM 2 does)",
    )

    def generator_arguments(self, keys: Iterable[str]) -> dict[str, Any]:
        """The settings named by `keys` as keyword arguments of a generator."""
        values = dataclasses.asdict(self)
        return {key: values[key] for key in keys}


# Here rather than in models/sam2, whose package imports torch: the client's command line and config
# validation need these keys without it.
@dataclass(frozen=True)
class Sam2AmgSettings(AmgSettings):
    """SAM 2's settings: the shared keys and SAM2AutomaticMaskGenerator's own."""

    use_m2m: bool = option(False, boolean, "SAM 2 only: refine each mask with its own logits as a mask prompt")
    multimask_output: bool = option(
        True, boolean, "SAM 2 only: three masks per grid point (else one, chosen by stability as SAM 2 does)"
    )


@dataclass(frozen=True)
class ImageSettings:
    """How an image file becomes the 8-bit RGB that SAM sees (server/imaging.py): a config or a request may
    set each key."""

    intensity: str = option(
        "auto",
        one_of(INTENSITY_MODES),
        "how samples map to 8 bits: linear (the dtype's full range: uint16 65535 -> 255, float [0, 1]), minmax "
        "(each channel's lowest..highest), percentile (each channel's percentile_low..percentile_high), auto "
        "(uint8 as it is, wider or float by percentile: a 12-bit camera's 0..4095 would otherwise be black)",
    )
    percentile_low: float = option(
        DEFAULT_PERCENTILES[0], float_in(0.0, 100.0), "the percentile that becomes 0 (intensity percentile and auto)"
    )
    percentile_high: float = option(
        DEFAULT_PERCENTILES[1], float_in(0.0, 100.0), "the percentile that becomes 255 (intensity percentile and auto)"
    )
    page: int = option(
        0, int_in(0, 1_000_000), "the page (TIFF IFD) to segment, from 0 (a file of one page has only page 0)"
    )
    channels: tuple[int, ...] | None = option(
        None,
        _channels,
        "one channel (shown as gray) or three (as R, G, B), numbered from 0; none: gray as gray, RGB(A) as RGB, "
        "any other count its first channel",
    )

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


def fields_of(*classes: type) -> list[dataclasses.Field[Any]]:
    """The fields of the dataclasses `classes`, in order, each name once (a subclass repeats its base's)."""
    return list({f.name: f for cls in classes for f in dataclasses.fields(cls)}.values())


def rules_of(*classes: type) -> dict[str, Check]:
    """Each key of the dataclasses `classes` -> its check."""
    return {f.name: f.metadata["check"] for f in fields_of(*classes) if "check" in f.metadata}


# Every family's AMG settings type: a config, a request or the client's command line may give any of
# their keys, and a model refuses those its family's type lacks (foreign_keys).
AMG_SETTINGS: tuple[type[AmgSettings], ...] = (AmgSettings, Sam2AmgSettings)
AMG_RULES: dict[str, Check] = rules_of(*AMG_SETTINGS)
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
    if not known:
        return f"{', '.join(map(repr, foreign))} do(es) not apply to {model}, which has no automatic mask generation"
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
