"""Request decoding: one request's fields and headers in, a validated Job out (or a ServiceError).

Everything that can be refused without the model is refused here, before any engine runs: the
answer format (Accept) and its `output`, the image (format, size, corruption), the options and the
prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_fast_serve.common.errors import BadRequest, InvalidOption
from sam_fast_serve.common.options import IMAGE_RULES, AmgSettings, apply_image_options, apply_request_options
from sam_fast_serve.common.prompts import has_prompts, parse_prompts, split_prompt_fields
from sam_fast_serve.common.wire import OUTPUT_OPTION
from sam_fast_serve.models.embedding import is_pixel_key, pixel_key
from sam_fast_serve.server.config import ServiceConfig
from sam_fast_serve.server.formats import AnswerFormat, Body, choose_format, resolve_output
from sam_fast_serve.server.imaging import decode_image
from sam_fast_serve.server.payload import parse_request


@dataclass
class Job:
    """One decoded request: automatic (`settings`) or prompted (`prompt_fields`), answered in
    `answer_format` showing `output`."""

    answer_format: AnswerFormat
    output: str
    image: np.ndarray | None  # RGB uint8 (H, W, 3); None when the request names a cached image
    image_id: str
    settings: AmgSettings | None = None
    prompt_fields: dict[str, Any] | None = None

    def body(self, payload: Any) -> Body:
        """The engine's answer to this job (`payload`) written in the job's format."""
        if self.settings is None:
            return self.answer_format.prompted(payload, self.image, self.output)
        assert self.image is not None
        return self.answer_format.automatic(payload, self.image)


def decode_job(fields: Mapping[str, Any], headers: Mapping[str, Any], config: ServiceConfig) -> Job:
    """Decode one request. Raises the ServiceError (4xx) that says what is wrong with it."""
    answer_format = choose_format(headers)
    request = parse_request(fields)
    options = dict(request.options)
    image_id = options.pop("image_id", None)
    image_options = {key: options.pop(key) for key in list(options) if key in IMAGE_RULES}
    prompt_fields = split_prompt_fields(options)
    output = resolve_output(
        answer_format,
        options.pop(OUTPUT_OPTION, None),
        prompted=has_prompts(prompt_fields),
        image_sent=request.image is not None,
        return_logits=prompt_fields.get("return_logits") is True,
    )
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
        return Job(answer_format, output, image, image_id, prompt_fields=prompt_fields)
    if prompt_fields:
        raise InvalidOption(
            f"{', '.join(map(repr, sorted(prompt_fields)))} given without 'points', 'boxes' or 'mask_input'"
        )
    if image is None:
        raise BadRequest(
            "automatic mask generation needs the image itself; 'image_id' works with points, boxes or a mask_input"
        )
    return Job(
        answer_format,
        output,
        image,
        image_id,
        settings=apply_request_options(config.amg, options, config.family.amg_keys, config.model_type),
    )
