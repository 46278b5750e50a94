"""The shared tier of the embedding store (models.embedding.EmbeddingStore): Redis, shared by every
worker and replica, behind each worker's LRU.

A Redis entry is the raw bytes of the embedding's tensors (one for SAM 1, three for SAM 2) behind a
small header (sizes; each tensor's name, dtype, shape and byte count) under a key that names the
model (model type, checkpoint sha256, dtype, int8 encoder linears or not), so two
models sharing one Redis never read each other's embeddings. Nothing is pickled: an entry that does
not parse, is cut short or does not fit this model is a miss. Redis down or slow never fails a
request that carries its image (the store is skipped, logged and counted); a request that has only
an image_id needs the store, and gets ServiceUnavailable (503, retryable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from sam_fast_serve.models.embedding import ImageEmbedding, SharedStoreError

logger = logging.getLogger(__name__)

# The password of a Redis URL without one: secrets stay out of the archive and the config.
PASSWORD_ENV = "SAM_FAST_REDIS_PASSWORD"
# A worker waits at most this long for Redis per command (connect, or a reply): a down or stalled
# Redis costs a request this much, never a hung worker.
TIMEOUT_S = 0.25
# Version 2: named tensors (a family's embedding may have several).
_MAGIC = b"SAM-EMB2"


@dataclass(frozen=True)
class ModelIdentity:
    """What makes embeddings interchangeable: same model type, same weights, same compute dtype,
    same quantization."""

    model_type: str
    checkpoint_sha256: str
    dtype: torch.dtype  # of the embeddings
    # "int8" where the image encoder's linear layers computed in int8 (`dtype: int8`): its
    # embeddings are tensors of `dtype` like the float model's, and must not be taken for them.
    quantization: str | None = None

    def key_prefix(self) -> str:
        model = f"{self.model_type}:{self.checkpoint_sha256}:{self.dtype}"
        if self.quantization:
            model += f":{self.quantization}"
        digest = hashlib.sha256(model.encode()).hexdigest()
        return f"sam-fast:emb:{digest[:16]}:"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_entry(embedding: ImageEmbedding) -> bytes:
    """The Redis value of an embedding: magic, header length, JSON header (sizes, then each tensor's
    name, dtype, shape and byte count, in order), the tensors' raw bytes one after another."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in embedding.tensors.items()}
    header = json.dumps(
        {
            "input_size": list(embedding.input_size),
            "original_size": list(embedding.original_size),
            "tensors": [
                {
                    "name": name,
                    "dtype": _dtype_name(t.dtype),
                    "shape": list(t.shape),
                    "nbytes": t.numel() * t.element_size(),
                }
                for name, t in tensors.items()
            ],
        }
    ).encode()
    raw = b"".join(t.view(torch.uint8).numpy().tobytes() for t in tensors.values() if t.numel())
    return _MAGIC + struct.pack(">I", len(header)) + header + raw


# A header is a few hundred bytes; an image side is at most this (config's max_image_pixels caps
# pixels at 10^9): an entry claiming more is no entry of ours, whatever else it holds.
_MAX_HEADER_BYTES = 64 * 1024
_MAX_SIDE = 1_000_000_000


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int and 0 < v <= _MAX_SIDE for v in value):
        return value[0], value[1]
    return None


def decode_entry(value: bytes, dtype: torch.dtype, layout: Mapping[str, tuple[int, ...]]) -> ImageEmbedding | None:
    """The embedding in a Redis value, or None when it is not a whole, well-formed entry of exactly
    the tensors of `layout` (name -> shape, batch dimension included), in that order, in `dtype`."""
    if not value.startswith(_MAGIC) or len(value) < len(_MAGIC) + 4:
        return None
    (length,) = struct.unpack(">I", value[len(_MAGIC) : len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    if length > _MAX_HEADER_BYTES or start + length > len(value):
        return None
    try:
        header = json.loads(value[start : start + length])
    except (ValueError, RecursionError):  # RecursionError: a header nested deeper than json parses
        return None
    if not isinstance(header, dict):
        return None
    input_size, original_size = _pair(header.get("input_size")), _pair(header.get("original_size"))
    if original_size is not None and original_size[0] * original_size[1] > _MAX_SIDE:
        return None
    element = torch.empty(0, dtype=dtype).element_size()
    sizes = {name: math.prod(shape) * element for name, shape in layout.items()}
    expected = [
        {"name": name, "dtype": _dtype_name(dtype), "shape": list(shape), "nbytes": sizes[name]}
        for name, shape in layout.items()
    ]
    raw = value[start + length :]
    if input_size is None or original_size is None or header.get("tensors") != expected:
        return None
    if len(raw) != sum(sizes.values()):
        return None
    tensors, offset = {}, 0
    buffer = bytearray(raw)
    for name, shape in layout.items():
        chunk = torch.frombuffer(buffer, dtype=torch.uint8, offset=offset, count=sizes[name])
        tensors[name] = chunk.view(dtype).reshape(shape)
        offset += sizes[name]
    return ImageEmbedding(tensors, input_size, original_size)


class RedisEmbeddings:
    """Embeddings in Redis under this model's keys, each with a TTL. Every method raises
    SharedStoreError when Redis cannot be reached in time."""

    def __init__(self, url: str, identity: ModelIdentity, layout: Mapping[str, tuple[int, ...]], ttl_s: int) -> None:
        options = {}
        if os.environ.get(PASSWORD_ENV) and not redis.connection.parse_url(url).get("password"):
            options["password"] = os.environ[PASSWORD_ENV]
        self.client = redis.Redis.from_url(
            url,
            **options,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self.prefix = identity.key_prefix()
        self.dtype = identity.dtype
        self.layout = dict(layout)
        self.ttl_s = ttl_s

    def get(self, key: str) -> ImageEmbedding | None:
        try:
            value = self.client.get(self.prefix + key)
        except redis.RedisError as exc:
            raise SharedStoreError(f"{type(exc).__name__}: {exc}") from exc
        if value is None:
            return None
        embedding = decode_entry(bytes(value), self.dtype, self.layout)  # type: ignore[arg-type]
        if embedding is None:
            logger.warning("embedding store entry %s is not a valid embedding of this model: treated as a miss", key)
        return embedding

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        try:
            self.client.set(self.prefix + key, encode_entry(embedding), ex=self.ttl_s)
        except redis.RedisError as exc:
            raise SharedStoreError(f"{type(exc).__name__}: {exc}") from exc
