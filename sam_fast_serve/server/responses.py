"""Response encoding: a payload of builtins, or a ServiceError, to the Reply TorchServe sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sam_fast_serve.common.errors import ResponseTooLarge, ServiceError
from sam_fast_serve.common.wire import JSON_MEDIA_TYPE, encode_json, encode_pickled

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


def payload_reply(payload: Any, as_json: bool, image_id: str, max_bytes: int) -> Reply:
    """A 200 carrying `payload` (builtins) as JSON or pickle+zlib+base64, and the image's cache key.

    Raises ResponseTooLarge when the body would be over `max_bytes` (both encodings are ASCII).
    """
    headers = {IMAGE_ID_HEADER: image_id}
    if as_json:
        reply = Reply(200, encode_json(payload), JSON_MEDIA_TYPE, headers)
    else:
        reply = Reply(200, encode_pickled(payload), PICKLE_CONTENT_TYPE, headers)
    if len(reply.body) > max_bytes:
        raise ResponseTooLarge(
            f"the response would be {len(reply.body):,} bytes, over max_response_bytes ({max_bytes:,}): ask for "
            "fewer masks (a higher pred_iou_thresh or stability_score_thresh, fewer points_per_side) or send a "
            "smaller image; the operator can raise max_response_bytes with config.properties' max_response_size"
        )
    return reply
