"""The client of a sam-fast TorchServe: SamClient for Python (client/http.py), and sam-fast-client
for folders of images (results as JSON, COCO, overlays and label images). Torch free: it needs the
base install only."""

from __future__ import annotations

from sam_fast_serve.client.cli import main
from sam_fast_serve.client.http import (
    Annotations,
    BadAnswer,
    BadRequestError,
    NotAuthorized,
    SamClient,
    SamError,
    ServerBusy,
    ServerError,
    TransportError,
)

__all__ = [
    "Annotations",
    "BadAnswer",
    "BadRequestError",
    "NotAuthorized",
    "SamClient",
    "SamError",
    "ServerBusy",
    "ServerError",
    "TransportError",
    "main",
]
