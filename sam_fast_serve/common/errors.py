"""The error contract: every rejected request is one of these, mapped to a 4xx/5xx status."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A failure with an HTTP status, a short kind and a message a client can act on."""

    status: int = 400
    kind: str = "bad_request"

    def __init__(self, message: str, *, status: int = 0, kind: str = "") -> None:
        super().__init__(message)
        self.message = message
        if status:
            self.status = status
        if kind:
            self.kind = kind

    def to_body(self) -> dict[str, Any]:
        """The JSON body every error response carries."""
        return {"code": self.status, "error": self.kind, "message": self.message}


class BadRequest(ServiceError):
    """The request cannot be understood (empty body, bad base64, JSON without an image, corrupt image)."""

    status = 400
    kind = "bad_request"


class UnsupportedMediaType(ServiceError):
    """The bytes are a file type we do not decode."""

    status = 415
    kind = "unsupported_media_type"


class NotAcceptable(ServiceError):
    """The request's Accept header names no format the server writes."""

    status = 406
    kind = "not_acceptable"


class PayloadTooLarge(ServiceError):
    """The image is over the configured pixel limit, or is a decompression bomb."""

    status = 413
    kind = "payload_too_large"


class InvalidOption(ServiceError):
    """A per-request option or prompt is unknown or out of range."""

    status = 422
    kind = "invalid_option"


class ResponseTooLarge(ServiceError):
    """The answer to a valid request is longer than the server may send."""

    status = 422
    kind = "response_too_large"


class NotFound(ServiceError):
    """A referenced resource (a cached image embedding) is not there."""

    status = 404
    kind = "not_found"


class OutOfMemory(ServiceError):
    """The server ran out of memory for this request; it freed what it could."""

    status = 507
    kind = "out_of_memory"


class InternalError(ServiceError):
    """A bug or unexpected failure while serving one request; the traceback is in the worker log."""

    status = 500
    kind = "internal_error"


class ConfigError(ValueError):
    """The model configuration is invalid; raised at model load, names the key or file."""


class ServiceUnavailable(ServiceError):
    """A store the request needs is not answering; retrying later may succeed."""

    status = 503
    kind = "store_unavailable"


def check_image_size(width: int, height: int, max_pixels: int, limit_key: str = "max_image_pixels") -> None:
    """Refuse an empty image (BadRequest) or one over `max_pixels`, the handler key `limit_key`
    (PayloadTooLarge), from its header."""
    if width <= 0 or height <= 0:
        raise BadRequest(f"the image is {width}x{height} pixels; it must not be empty")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} pixels (handler key {limit_key})"
        )
