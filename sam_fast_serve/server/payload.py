"""One TorchServe request (its fields by name) in, the image bytes and request options out.

Accepted forms: a raw body (`curl -T img.jpg`), a multipart file, a base64 string (optionally a
`data:` URL), and JSON `{"image": "<base64>", ...options}`. TorchServe hands JSON bodies over
already parsed and text bodies as str; everything else arrives as bytes. A video request
(common.tracks) is JSON `{"video": "<base64>", ...options}` or a multipart part named "video".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sam_fast_serve.common.errors import BadRequest, UnsupportedMediaType
from sam_fast_serve.common.options import AMG_RULES, IMAGE_RULES
from sam_fast_serve.common.prompts import PROMPT_FIELDS
from sam_fast_serve.common.tracks import VIDEO_FIELD
from sam_fast_serve.common.wire import OUTPUT_OPTION
from sam_fast_serve.server.imaging import EMPTY_IMAGE, sniff_format

# Field names under which an image is looked for, in order; TorchServe names a raw body "body".
IMAGE_FIELDS = ("image", "data", "file", "body")
# Form fields that are options, never the image.
OPTION_FIELDS = frozenset(("image_id", OUTPUT_OPTION, *PROMPT_FIELDS, *AMG_RULES, *IMAGE_RULES))
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_BASE64_TEXT = re.compile(rb"^[A-Za-z0-9+/=\s_-]+$")


@dataclass
class ParsedRequest:
    """The image file bytes of a request (None when it names a cached image by `image_id`) and
    its options (everything but the image)."""

    image: bytes | None
    options: dict[str, Any] = field(default_factory=dict)


def _b64decode(text: str | bytes, what: str = "image") -> bytes:
    if isinstance(text, str):
        text = _DATA_URL.sub("", text.strip()).encode("ascii", "ignore")
    compact = b"".join(text.split())
    try:
        # Accept both alphabets and missing padding: clients differ on both.
        standard = compact.replace(b"-", b"+").replace(b"_", b"/")
        return base64.b64decode(standard + b"=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"the {what} is not valid base64 ({exc})") from exc


def _from_json_object(obj: Any) -> ParsedRequest:
    if not isinstance(obj, dict):
        raise BadRequest('a JSON body must be an object like {"image": "<base64>"}')
    image = obj.get("image")
    options = {k: v for k, v in obj.items() if k != "image"}
    if image is None and "image_id" in obj:
        return ParsedRequest(None, options)
    if not isinstance(image, str) or not image.strip():
        raise BadRequest('the JSON body has no "image" field with a base64-encoded image (or an "image_id")')
    return ParsedRequest(_b64decode(image), options)


def _from_text(text: str | bytes) -> ParsedRequest:
    stripped = text.strip()
    if stripped[:1] in ("{", b"{"):
        try:
            return _from_json_object(json.loads(stripped))
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nesting too deep
            raise BadRequest(f"the body looks like JSON but does not parse: {exc}") from exc
    if isinstance(stripped, bytes) and not _BASE64_TEXT.match(stripped):
        # Not base64 text: hand the bytes to the decoder, which names what it accepts.
        return ParsedRequest(bytes(stripped))
    raw = _b64decode(stripped)
    if not raw:
        raise BadRequest("the base64 text decodes to nothing")
    return ParsedRequest(raw)


def _form_option(value: Any) -> Any:
    # Form fields arrive as bytes or text; numbers, booleans and lists are written as JSON.
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_request(fields: Mapping[str, Any]) -> ParsedRequest:
    """Find the image in a request's fields and return it with the request's options.

    Raises BadRequest when there is no image or an empty one, the JSON has no "image", or the base64 is invalid.
    """
    name = next((n for n in IMAGE_FIELDS if fields.get(n) not in (None, b"", "")), None)
    if name is None:
        filled = [n for n, v in fields.items() if isinstance(v, (bytes, bytearray)) and v and n not in OPTION_FIELDS]
        name = filled[0] if len(filled) == 1 else None
    if name is None and "image_id" in fields:
        return ParsedRequest(None, {k: _form_option(v) for k, v in fields.items()})
    if name is None and any(fields.get(n) in (b"", "") for n in IMAGE_FIELDS):
        raise BadRequest(EMPTY_IMAGE)
    if name is None:
        raise BadRequest(
            "the request has no image: send the file as the body, as a multipart field named "
            "'image' or 'data', as base64 text, or as JSON {\"image\": \"<base64>\"}"
        )
    value = fields[name]
    if isinstance(value, (dict, list)):
        parsed = _from_json_object(value)
    elif isinstance(value, str):
        parsed = _from_text(value)
    else:
        raw = bytes(value)
        try:
            sniff_format(raw)
            parsed = ParsedRequest(raw)
        except UnsupportedMediaType:
            parsed = _from_text(raw)
    form_options = {k: _form_option(v) for k, v in fields.items() if k != name}
    parsed.options = {**form_options, **parsed.options}
    return parsed


@dataclass
class ParsedVideo:
    """The video file bytes of a video request and its options (everything but the video)."""

    video: bytes
    options: dict[str, Any]


def _json_text(value: Any) -> Any:
    """A text body that is a JSON object naming a video, parsed; None for any other body (an image
    request: base64 text has no quotes)."""
    if not isinstance(value, (str, bytes)) or value.strip()[:1] not in ("{", b"{"):
        return None
    if (b'"' + VIDEO_FIELD.encode() + b'"') not in (value.encode() if isinstance(value, str) else value):
        return None
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body looks like JSON but does not parse: {exc}") from exc


def parse_video_request(fields: Mapping[str, Any]) -> ParsedVideo | None:
    """The video and options of a video request, None for an image request.

    Raises BadRequest when the "video" is not base64 text of a file.
    """
    if fields.get(VIDEO_FIELD) not in (None, b"", ""):
        value = fields[VIDEO_FIELD]
        video = _b64decode(value, "video") if isinstance(value, str) else bytes(value)
        return ParsedVideo(video, {k: _form_option(v) for k, v in fields.items() if k != VIDEO_FIELD})
    body = next((fields[n] for n in ("body", "data") if fields.get(n) not in (None, b"", "")), None)
    obj = body if isinstance(body, dict) else _json_text(body)
    if not isinstance(obj, dict) or VIDEO_FIELD not in obj:
        return None
    video = obj[VIDEO_FIELD]
    if not isinstance(video, str) or not video.strip():
        raise BadRequest(f'"{VIDEO_FIELD}" must be the video file in base64')
    return ParsedVideo(_b64decode(video, "video"), {k: v for k, v in obj.items() if k != VIDEO_FIELD})
