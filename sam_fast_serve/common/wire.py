"""The wire format of a response, and a safe decoder for clients.

Default: the annotations, built only from Python builtins, pickled, zlib-compressed and base64-
encoded (ASCII text). `application/json` clients get the same annotations as JSON, and `image/png`
clients a finished picture instead (server/formats.py holds the table; `output` below says which
picture a prompted answer is). A client must decode the pickle with `decode_pickled`, whose
unpickler refuses every global: a pickle of builtins needs none, and a malicious one (e.g.
referencing os.system) is refused instead of run.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from typing import Any

from sam_fast_serve.common.options import Check, one_of
from sam_fast_serve.common.records import ANNOTATION_KEYS

JSON_MEDIA_TYPE = "application/json"
PNG_MEDIA_TYPE = "image/png"
# config.properties' max_request_size: TorchServe answers a longer body with an empty 413, before
# the handler sees it (tests/unit/test_wire.py keeps the two equal).
MAX_REQUEST_SIZE = 26214400
# Every 200 carries the image's embedding-cache key: sent back as "image_id" with prompts.
IMAGE_ID_HEADER = "X-Image-Id"
# The request option that picks what a prompted image/png answer shows: "mask", an 8-bit mask (0 or
# 255), or "cutout", the object cut out of the image (RGBA: the image's RGB, the mask as alpha).
OUTPUT_OPTION = "output"
OUTPUTS = ("mask", "cutout")
DEFAULT_OUTPUT = "mask"
check_output: Check = one_of(OUTPUTS)
# Chosen by benchmarks/bench_wire.py: level 1 is within 6% of level 9's size (0.56 vs 0.53 of
# pickle+base64 on ~100 natural masks) and 4x faster to encode (29 vs 125 ms on 48 fragmented masks).
DEFAULT_ZLIB_LEVEL = 1


def encode_pickled(payload: Any, level: int = DEFAULT_ZLIB_LEVEL) -> str:
    """pickle -> zlib -> base64, as ASCII text. `payload` must hold only builtins."""
    raw = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(zlib.compress(raw, level)).decode("ascii")


def encode_json(payload: Any) -> str:
    """The same payload as compact JSON text."""
    return json.dumps(payload, separators=(",", ":"))


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: the response must hold only builtins")


def decode_pickled(text: str | bytes, max_bytes: int = 1 << 30) -> Any:
    """Inverse of `encode_pickled` for untrusted input.

    Raises pickle.UnpicklingError for a pickle that references any global (class or function),
    and ValueError when the input is not base64/zlib or inflates past `max_bytes`.
    """
    try:
        compressed = base64.b64decode(text, validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(compressed, max_bytes)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"not a base64 zlib payload: {exc}") from exc
    if inflater.unconsumed_tail:
        raise ValueError(f"payload inflates past {max_bytes} bytes")
    return _NoGlobalsUnpickler(io.BytesIO(raw)).load()


def is_prompt_response(payload: Any) -> bool:
    """Whether `payload` has the shape of a prompted answer: {"image_id", "prompts": [{"masks"}]}."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("image_id"), str)
        and isinstance(payload.get("prompts"), list)
        and all(isinstance(p, dict) and isinstance(p.get("masks"), list) for p in payload["prompts"])
    )


def is_annotation_list(payload: Any) -> bool:
    """Whether `payload` has the shape of a list of AMG annotations (used by clients and tests)."""
    return isinstance(payload, list) and all(
        isinstance(a, dict)
        and set(ANNOTATION_KEYS) <= set(a)
        and isinstance(a["segmentation"], dict)
        and isinstance(a["segmentation"].get("counts"), str)
        for a in payload
    )
