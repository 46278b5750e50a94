"""Response encoding: a payload of builtins, or a ServiceError, to the Reply TorchServe sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ServiceError
from .wire import JSON_MEDIA_TYPE, encode_json, encode_pickled

PICKLE_CONTENT_TYPE = "text/plain; charset=us-ascii"
# Every 200 carries the image's embedding-cache key: send it back as "image_id" with prompts.
IMAGE_ID_HEADER = "X-Image-Id"


@dataclass
class Reply:
    """One response: HTTP status, body text, its content type and extra headers."""

    status: int
    body: str
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(error: ServiceError) -> Reply:
    """The JSON error body with the error's status."""
    return Reply(error.status, encode_json(error.to_body()), JSON_MEDIA_TYPE)


def payload_reply(payload: Any, as_json: bool, image_id: str) -> Reply:
    """A 200 carrying `payload` (builtins) as JSON or pickle+zlib+base64, and the image's cache key."""
    headers = {IMAGE_ID_HEADER: image_id}
    if as_json:
        return Reply(200, encode_json(payload), JSON_MEDIA_TYPE, headers)
    return Reply(200, encode_pickled(payload), PICKLE_CONTENT_TYPE, headers)
