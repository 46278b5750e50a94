"""Response encoding: an answer's body (written by its format, server/formats.py), or a
ServiceError, to the Reply TorchServe sends."""

from __future__ import annotations

from dataclasses import dataclass, field

from sam_fast_serve.common.errors import ResponseTooLarge, ServiceError
from sam_fast_serve.common.wire import IMAGE_ID_HEADER, JSON_MEDIA_TYPE, encode_json
from sam_fast_serve.server.formats import Body


@dataclass
class Reply:
    """One response: HTTP status, body (text, or bytes for a picture), its content type and extra headers."""

    status: int
    body: Body
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(error: ServiceError) -> Reply:
    """The JSON error body with the error's status, whatever format the request asked for."""
    return Reply(error.status, encode_json(error.to_body()), JSON_MEDIA_TYPE)


def payload_reply(body: Body, content_type: str, image_id: str | None, max_bytes: int) -> Reply:
    """A 200 carrying `body` as `content_type`, and the image's cache key (a video answer has none).

    Raises ResponseTooLarge when the body is over `max_bytes` (a text body is ASCII: a character a byte).
    """
    if len(body) > max_bytes:
        raise ResponseTooLarge(
            f"the response would be {len(body):,} bytes, over max_response_bytes ({max_bytes:,}): ask for "
            "fewer masks (a higher pred_iou_thresh or stability_score_thresh, fewer points_per_side) or send a "
            "smaller image; the operator can raise max_response_bytes with config.properties' max_response_size"
        )
    return Reply(200, body, content_type, {} if image_id is None else {IMAGE_ID_HEADER: image_id})
