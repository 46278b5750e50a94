"""sam-fast-serve: SAM mask generation behind TorchServe, and a torch-free client.

    common/   what client and server share (errors, wire, records, options, prompts, TIFF, intensity)
    client/   sam-fast-client (torch free)
    server/   the mask service: decode -> predict -> encode, config, metrics, store, TorchServe handler
    models/   the registry (model_type -> family), the engine interface, one folder per family
    tools/    sam-fast-serve: the archive, checkpoints, waiting for a server

Importing the package imports no torch: the client names load with it, the server names
(`sam_model_fast_registry`, `SamAutomaticMaskGenerator`, `MaskService`) on first use, and those
need the `serve` extra.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

# Public name -> module that defines it.
_PUBLIC = {
    "decode_pickled": "common.wire",
    "encode_pickled": "common.wire",
    "encode_json": "common.wire",
    "sam_model_fast_registry": "models.registry",
    "SamAutomaticMaskGenerator": "models.sam1.automatic",
    "MaskService": "server.service",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
