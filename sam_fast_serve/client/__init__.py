"""sam-fast-client: folders of images through a SAM server, results as JSON, COCO and overlays.
Torch free: it needs the base install only."""

from __future__ import annotations

from sam_fast_serve.client.cli import main

__all__ = ["main"]
