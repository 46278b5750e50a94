"""What a request asks besides its image, checked before it is sent with the server's own rules
(common/options.py, common/prompts.py, common/concepts.py), so a bad value is refused with the
server's message before any image goes out.

Options are the server's AMG keys (automatic masks only) and image keys (any request); prompts
are points (with labels) and boxes in image pixels; concepts are phrases and/or exemplar boxes
(a SAM 3 server finds every instance of each).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from sam_fast_serve.common.concepts import EXEMPLAR_CONCEPT, parse_concepts
from sam_fast_serve.common.errors import InvalidOption
from sam_fast_serve.common.options import AMG_RULES, IMAGE_RULES, ImageSettings, check_keys
from sam_fast_serve.common.prompts import parse_prompts

# The prompt fields a client sends; the server's other prompt fields (mask_input, return_logits)
# carry logits, which a client writing files has no use for.
PROMPT_KEYS = ("points", "labels", "boxes", "multimask")
# Prompts are checked here against an image of no bounds: the server checks them against the image.
_NO_BOUNDS = (sys.maxsize, sys.maxsize)


def _plain(value: Any) -> Any:
    """`value` as JSON can carry it: numpy arrays and tuples become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def checked_options(options: Mapping[str, Any], prompted: bool, asked: str = "prompts") -> dict[str, Any]:
    """`options` (server keys -> values) as the request sends them, after the server's checks;
    `prompted`: the request asks for something else than automatic masks (`asked`: what, for the
    message: "prompts", "concepts").

    Raises ValueError with the server's message for an unknown key, a value out of range, a pair
    of percentiles out of order, or an AMG option with prompts or concepts (the server takes those
    for automatic masks only).
    """
    plain = {key: _plain(value) for key, value in options.items()}
    check_keys(plain, {**AMG_RULES, **IMAGE_RULES}, ValueError, "option")
    amg = sorted(set(plain) & set(AMG_RULES))
    if prompted and amg:
        raise ValueError(f"option(s) {', '.join(amg)} apply to automatic mask generation, not to {asked}")
    if {"percentile_low", "percentile_high"} <= set(plain):
        problem = ImageSettings(
            percentile_low=plain["percentile_low"], percentile_high=plain["percentile_high"]
        ).problem()
        if problem:
            raise ValueError(problem)
    return plain


def checked_prompts(
    points: Sequence[Sequence[float]] | None = None,
    labels: Sequence[int] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    multimask: bool | None = None,
) -> dict[str, Any]:
    """The prompt fields of a request (those given), after the server's checks of their form:
    points [[x, y], ...], labels 1/0 one per point (default all 1), boxes [[x0, y0, x1, y1], ...]
    with x0 < x1 and y0 < y1, at most as many as the server takes. Whether they fall inside the
    image is the server's check. Raises ValueError with the server's message."""
    given = {"points": points, "labels": labels, "boxes": boxes, "multimask": multimask}
    fields = {name: _plain(value) for name, value in given.items() if value is not None}
    try:
        parse_prompts(fields, _NO_BOUNDS, None)
    except InvalidOption as exc:
        raise ValueError(exc.message) from None
    return fields


def checked_concepts(
    texts: str | Sequence[str] | None = None,
    exemplar_boxes: Sequence[Sequence[float]] | None = None,
    exemplar_labels: Sequence[int] | None = None,
    threshold: float | None = None,
    mask_threshold: float | None = None,
    max_instances: int | None = None,
) -> dict[str, Any]:
    """The concept fields of a request (those given; `texts` is sent as "text": one phrase as a
    string, several as a list), after the server's checks (common.concepts.parse_concepts):
    phrases non-empty and not too long or many, exemplar boxes [[x0, y0, x1, y1], ...] with
    x0 < x1 and y0 < y1, labels 1/0 one per box, thresholds from 0 to 1, max_instances at least 1.
    Whether the boxes fall inside the image is the server's check. Raises ValueError with the
    server's message (a request with neither phrase nor exemplar box is one too)."""
    given = {
        "text": texts,
        "exemplar_boxes": exemplar_boxes,
        "exemplar_labels": exemplar_labels,
        "threshold": threshold,
        "mask_threshold": mask_threshold,
        "max_instances": max_instances,
    }
    fields = {name: _plain(value) for name, value in given.items() if value is not None}
    try:
        parse_concepts(fields)
    except InvalidOption as exc:
        raise ValueError(exc.message) from None
    return fields


def concept_names(fields: Mapping[str, Any]) -> tuple[str, ...]:
    """The concepts a request's fields ask for, in order, as its records name them: each phrase
    of "text", or EXEMPLAR_CONCEPT for exemplar boxes alone. Fields are not checked here."""
    text = fields.get("text")
    if text is None:
        return (EXEMPLAR_CONCEPT,)
    return tuple(text) if isinstance(text, list | tuple) else (text,)
