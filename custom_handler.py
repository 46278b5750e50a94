"""The TorchServe handler file of the model archive: SAM (1 and 2.1) mask generation.

The code is the package's (sam_fast_serve/server/handler.py, which the archive carries). TorchServe
takes the one class this file defines, so the handler is subclassed here rather than imported.
"""

from __future__ import annotations

from sam_fast_serve.server.handler import SamAutomaticMaskHandler as _Handler


class SamAutomaticMaskHandler(_Handler):
    """Loads the model named by model-config.yaml's `handler:` section (SAM 1 or SAM 2.1, by its
    `model_type`) and serves each request with its own status."""
