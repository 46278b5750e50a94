"""Request decoding: one request's fields and headers in, a validated Job out (or a ServiceError).

Everything that can be refused without the model is refused here, before any engine runs: the
answer format (Accept) and its `output`, the image (format, size, corruption), the options and the
prompts. A video request (common.tracks) becomes a TrackJob: its file's header checked against the
limits, its options against the video, then its frames read (a video file's decoded into a
temporary file, removed when the job is closed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_fast_serve.common.concepts import has_concepts, parse_concepts, split_concept_fields
from sam_fast_serve.common.errors import BadRequest, InvalidOption, NotAcceptable
from sam_fast_serve.common.options import (
    AMG_RULES,
    IMAGE_RULES,
    AmgSettings,
    apply_image_options,
    apply_request_options,
)
from sam_fast_serve.common.prompts import has_prompts, parse_prompts, split_prompt_fields
from sam_fast_serve.common.tracks import TrackRequest, parse_track_request
from sam_fast_serve.common.wire import OUTPUT_OPTION
from sam_fast_serve.models.embedding import is_pixel_key, pixel_key
from sam_fast_serve.models.registry import Family, model_type, model_types_that
from sam_fast_serve.server.config import ServiceConfig
from sam_fast_serve.server.formats import FORMATS, AnswerFormat, Body, choose_format, resolve_output
from sam_fast_serve.server.frames import Frames, open_video
from sam_fast_serve.server.imaging import decode_image
from sam_fast_serve.server.payload import ParsedVideo, parse_request, parse_video_request


@dataclass
class Job:
    """One decoded request: automatic (`settings`), prompted (`prompt_fields`) or concepts
    (`concept_fields`), answered in `answer_format` showing `output`."""

    answer_format: AnswerFormat
    output: str
    image: np.ndarray | None  # RGB uint8 (H, W, 3); None when the request names a cached image
    image_id: str
    settings: AmgSettings | None = None
    prompt_fields: dict[str, Any] | None = None
    concept_fields: dict[str, Any] | None = None

    @property
    def mode(self) -> str:
        """What the job asks for: "automatic", "prompted" or "concepts" (a metrics label too)."""
        return (
            "automatic" if self.settings is not None else "prompted" if self.prompt_fields is not None else "concepts"
        )

    def body(self, payload: Any, size: tuple[int, int]) -> Body:
        """The engine's answer to this job (`payload`, on an image of `size` (H, W)) written in the
        job's format."""
        if self.prompt_fields is not None:
            return self.answer_format.prompted(payload, self.image, self.output)
        return self.answer_format.automatic(payload, size)


@dataclass
class TrackJob:
    """One decoded video request: its frames (read on demand), what to track, the answer format,
    and what holds the frames (`resources`: close it when the job ends)."""

    answer_format: AnswerFormat
    frames: Frames
    request: TrackRequest
    resources: contextlib.ExitStack
    settings: AmgSettings | None = None  # automatic mask generation's, for a request without prompts

    def line(self, record: Any) -> Body:
        """One record of the answer as a line in the job's format."""
        assert self.answer_format.line is not None
        return self.answer_format.line(record)


def decode_job(fields: Mapping[str, Any], headers: Mapping[str, Any], config: ServiceConfig) -> Job | TrackJob:
    """Decode one request. Raises the ServiceError (4xx) that says what is wrong with it."""
    answer_format = choose_format(headers)
    video = parse_video_request(fields)
    if video is not None:
        return decode_track_job(video, answer_format, config)
    request = parse_request(fields)
    options = dict(request.options)
    image_id = options.pop("image_id", None)
    image_options = {key: options.pop(key) for key in list(options) if key in IMAGE_RULES}
    prompt_fields = split_prompt_fields(options)
    concept_fields = split_concept_fields(options)
    check_served(config.family, config.model_type, prompt_fields, concept_fields)
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
    if has_concepts(concept_fields):
        if options or prompt_fields:
            raise InvalidOption(
                f"option(s) {', '.join(map(repr, sorted({**options, **prompt_fields})))} do not apply to a concept "
                "request ('text' or 'exemplar_boxes')"
            )
        parse_concepts(concept_fields, None if image is None else image.shape[:2])  # before the encoder runs
        return Job(answer_format, output, image, image_id, concept_fields=concept_fields)
    if concept_fields:
        raise InvalidOption(f"{', '.join(map(repr, sorted(concept_fields)))} given without 'text' or 'exemplar_boxes'")
    if has_prompts(prompt_fields):
        if options:
            raise InvalidOption(
                f"option(s) {', '.join(map(repr, sorted(options)))} apply to automatic mask generation, "
                "not to a request with points, boxes or a mask_input"
            )
        if image is not None:
            parse_prompts(
                prompt_fields, image.shape[:2], model_type(config.model_type).mask_input_side
            )  # refuse bad prompts before the encoder runs
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


def check_served(family: Family, model: str, prompt_fields: dict[str, Any], concept_fields: dict[str, Any]) -> None:
    """Refuse (400) a request of a kind the model's family does not serve, naming the model types
    that do: prompts, concepts, or (with neither) automatic mask generation."""
    if has_concepts(concept_fields) and not family.concepts:
        raise BadRequest(
            f"{model} ({family.title}) does not answer concepts ('text', 'exemplar_boxes'): that needs "
            f"{model_types_that(lambda f: f.concepts)}"
        )
    if has_prompts(prompt_fields) and not family.prompts:
        raise BadRequest(
            f"{model} ({family.title}) does not answer point, box or mask prompts: those need "
            f"{model_types_that(lambda f: f.prompts)}"
        )
    # Concept qualifiers alone (a threshold, labels) are refused by name later.
    if not concept_fields and not has_prompts(prompt_fields) and not family.automatic:
        kinds = " or ".join(
            kind
            for kind, served in (
                ("'text' or 'exemplar_boxes'", family.concepts),
                ("points, boxes or a mask_input", family.prompts),
            )
            if served
        )
        raise BadRequest(
            f"{model} ({family.title}) has no automatic mask generation: give {kinds}, or use "
            f"{model_types_that(lambda f: f.automatic)} for it"
        )


def decode_track_job(video: ParsedVideo, answer_format: AnswerFormat, config: ServiceConfig) -> TrackJob:
    """A video request's TrackJob: the model, the answer format, the limits (from the header), the
    options and prompts (against the video), then the frames, in that order, each refused with the
    ServiceError that names it."""
    if not config.family.video:
        raise BadRequest(
            f"{config.model_type} is a still-image model ({config.family.title}): a video request needs "
            f"{model_types_that(lambda f: f.video)}"
        )
    if answer_format.line is None:
        lines = ", ".join(media_type for media_type, known in FORMATS.items() if known.line is not None)
        raise NotAcceptable(f"a video answer is a record a frame, written as {lines}; not {answer_format.media_type}")
    options = dict(video.options)
    image_options = {key: options.pop(key) for key in list(options) if key in IMAGE_RULES}
    if "page" in image_options:
        raise InvalidOption("'page' picks one page of a TIFF; a video request tracks through every page")
    image = apply_image_options(config.image, image_options)
    amg_options = {key: options.pop(key) for key in list(options) if key in AMG_RULES}
    resources = contextlib.ExitStack()
    try:
        opened = open_video(video.video, config.video_limits, image, resources)
        request = parse_track_request(options, opened.count, (opened.height, opened.width), bool(amg_options))
        objects = {prompt.object for prompt in request.prompts}
        if len(objects) > config.max_video_objects:
            raise InvalidOption(
                f"the prompts mark {len(objects)} objects; at most {config.max_video_objects} are followed "
                "(handler key max_video_objects)"
            )
        settings = None
        if request.automatic is not None:
            settings = apply_request_options(config.amg, amg_options, config.family.amg_keys, config.model_type)
        frames = opened.select(request.frames)
    except BaseException:
        resources.close()
        raise
    return TrackJob(answer_format, frames, request, resources, settings)
