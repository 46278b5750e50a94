"""Request decoding: one request's fields and headers in, a validated Job out (or a ServiceError).

Everything that can be refused without the model is refused here, before any engine runs: the
image (format, size, corruption), the options and the prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_fast_serve.common.errors import BadRequest, InvalidOption
from sam_fast_serve.common.options import IMAGE_RULES, AmgSettings, apply_image_options, apply_request_options
from sam_fast_serve.common.prompts import has_prompts, parse_prompts, split_prompt_fields
from sam_fast_serve.models.embedding import is_pixel_key, pixel_key
from sam_fast_serve.server.config import ServiceConfig
from sam_fast_serve.server.imaging import decode_image
from sam_fast_serve.server.payload import parse_request


@dataclass
class Job:
    """One decoded request: automatic (`settings`) or prompted (`prompt_fields`)."""

    json: bool  # answer as JSON instead of pickle
    image: np.ndarray | None  # RGB uint8 (H, W, 3); None when the request names a cached image
    image_id: str
    settings: AmgSettings | None = None
    prompt_fields: dict[str, Any] | None = None


def wants_json(headers: Mapping[str, Any]) -> bool:
    """Whether the client's Accept header asks for JSON (header names compared case-insensitively)."""
    accept = next((v for k, v in headers.items() if k.lower() == "accept" and isinstance(v, str)), "")
    return "application/json" in accept.lower()


def decode_job(fields: Mapping[str, Any], headers: Mapping[str, Any], config: ServiceConfig) -> Job:
    """Decode one request. Raises the ServiceError (4xx) that says what is wrong with it."""
    request = parse_request(fields)
    options = dict(request.options)
    image_id = options.pop("image_id", None)
    image_options = {key: options.pop(key) for key in list(options) if key in IMAGE_RULES}
    prompt_fields = split_prompt_fields(options)
    as_json = wants_json(headers)
    image = None
    if request.image is not None:
        image = decode_image(request.image, config.max_image_pixels, apply_image_options(config.image, image_options))
        image_id = pixel_key(image)
    elif image_options:
        raise InvalidOption(
            f"{', '.join(map(repr, sorted(image_options)))} apply to an image sent, not to an 'image_id'"
        )
    elif not isinstance(image_id, str) or not is_pixel_key(image_id):
        # Checked before any store sees it: an id is also (part of) a Redis key.
        raise BadRequest("'image_id' must be the string an earlier response returned (32 hex digits)")
    if has_prompts(prompt_fields):
        if options:
            raise InvalidOption(
                f"option(s) {', '.join(map(repr, sorted(options)))} apply to automatic mask generation, "
                "not to a request with points, boxes or a mask_input"
            )
        if image is not None:
            parse_prompts(prompt_fields, image.shape[:2])  # refuse bad prompts before the encoder runs
        return Job(as_json, image, image_id, prompt_fields=prompt_fields)
    if prompt_fields:
        raise InvalidOption(
            f"{', '.join(map(repr, sorted(prompt_fields)))} given without 'points', 'boxes' or 'mask_input'"
        )
    if image is None:
        raise BadRequest(
            "automatic mask generation needs the image itself; 'image_id' works with points, boxes or a mask_input"
        )
    return Job(
        as_json,
        image,
        image_id,
        settings=apply_request_options(config.amg, options, config.family.amg_keys, config.model_type),
    )
