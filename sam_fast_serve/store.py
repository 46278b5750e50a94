"""Where image embeddings are kept between requests: this worker's LRU (embeddings.EmbeddingCache),
and optionally Redis behind it, shared by every worker and replica.

A Redis entry is the raw tensor bytes behind a small header (dtype, shape, sizes, byte count) under a
key that names the model (model type, checkpoint sha256, dtype, int8 encoder linears or not), so two
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
from collections import Counter
from dataclasses import dataclass

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from .embeddings import EmbeddingCache, ImageEmbedding
from .errors import ServiceUnavailable

logger = logging.getLogger(__name__)

# The password of a Redis URL without one: secrets stay out of the archive and the config.
PASSWORD_ENV = "SAM_FAST_REDIS_PASSWORD"
# A worker waits at most this long for Redis per command (connect, or a reply): a down or stalled
# Redis costs a request this much, never a hung worker.
TIMEOUT_S = 0.25
_MAGIC = b"SAM-EMB1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The Redis value of an embedding: magic, header length, JSON header, raw tensor bytes."""
    features = embedding.features.detach().to("cpu").contiguous()
    header = json.dumps(
        {
            "dtype": _dtype_name(features.dtype),
            "shape": list(features.shape),
            "input_size": list(embedding.input_size),
            "original_size": list(embedding.original_size),
            "nbytes": features.numel() * features.element_size(),
        }
    ).encode()
    raw = features.view(torch.uint8).numpy().tobytes() if features.numel() else b""
    return _MAGIC + struct.pack(">I", len(header)) + header + raw


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int and v > 0 for v in value):
        return value[0], value[1]
    return None


def decode_entry(value: bytes, dtype: torch.dtype, channels_shape: tuple[int, ...]) -> ImageEmbedding | None:
    """The embedding in a Redis value, or None when it is not a whole, well-formed entry of an
    embedding in `dtype` whose shape is (1, *channels_shape)."""
    if not value.startswith(_MAGIC) or len(value) < len(_MAGIC) + 4:
        return None
    (length,) = struct.unpack(">I", value[len(_MAGIC) : len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    try:
        header = json.loads(value[start : start + length])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    shape = header.get("shape")
    input_size, original_size = _pair(header.get("input_size")), _pair(header.get("original_size"))
    expected_shape = [1, *channels_shape]
    raw = value[start + length :]
    if (
        header.get("dtype") != _dtype_name(dtype)
        or shape != expected_shape
        or input_size is None
        or original_size is None
        or header.get("nbytes") != len(raw)
        or len(raw) != math.prod(expected_shape) * torch.empty(0, dtype=dtype).element_size()
    ):
        return None
    features = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(expected_shape)
    return ImageEmbedding(features, input_size, original_size)


class RedisEmbeddings:
    """Embeddings in Redis under this model's keys, each with a TTL. Every method raises
    redis.RedisError when Redis cannot be reached in time."""

    def __init__(self, url: str, identity: ModelIdentity, channels_shape: tuple[int, ...], ttl_s: int) -> None:
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
        self.channels_shape = channels_shape
        self.ttl_s = ttl_s

    def get(self, key: str) -> ImageEmbedding | None:
        value = self.client.get(self.prefix + key)
        if value is None:
            return None
        embedding = decode_entry(bytes(value), self.dtype, self.channels_shape)  # type: ignore[arg-type]
        if embedding is None:
            logger.warning("embedding store entry %s is not a valid embedding of this model: treated as a miss", key)
        return embedding

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        self.client.set(self.prefix + key, encode_entry(embedding), ex=self.ttl_s)


class EmbeddingStore:
    """The worker's LRU in front of an optional shared Redis store, with hit/miss/error counts
    (`counts`: local_hit, local_miss, shared_hit, shared_miss, shared_error)."""

    def __init__(self, local: EmbeddingCache, shared: RedisEmbeddings | None = None) -> None:
        self.local = local
        self.shared = shared
        self.counts: Counter[str] = Counter()

    def get(self, key: str, device: torch.device | None = None) -> ImageEmbedding | None:
        """The embedding of `key`, or None; Redis trouble counts as a miss (the caller has the image)."""
        try:
            return self.fetch(key, device)
        except ServiceUnavailable:
            return None

    def fetch(self, key: str, device: torch.device | None = None) -> ImageEmbedding | None:
        """The embedding of `key`, or None when no store has it. Raises ServiceUnavailable when the
        shared store cannot answer (the caller has only the key)."""
        embedding = self.local.get(key)
        self.counts["local_hit" if embedding is not None else "local_miss"] += 1
        if embedding is not None or self.shared is None:
            return embedding
        try:
            embedding = self.shared.get(key)
        except redis.RedisError as exc:
            self.counts["shared_error"] += 1
            logger.warning("embedding store unavailable for a read (%s: %s)", type(exc).__name__, exc)
            raise ServiceUnavailable(
                "the shared embedding store (Redis) is not answering; retry, or send the image itself"
            ) from exc
        self.counts["shared_hit" if embedding is not None else "shared_miss"] += 1
        if embedding is not None:
            if device is not None:
                embedding = ImageEmbedding(embedding.features.to(device), embedding.input_size, embedding.original_size)
            self.local.put(key, embedding)
        return embedding

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        """Keep `embedding` locally and in the shared store; a shared failure is logged, counted and skipped."""
        self.local.put(key, embedding)
        if self.shared is None:
            return
        try:
            self.shared.put(key, embedding)
        except redis.RedisError as exc:
            self.counts["shared_error"] += 1
            logger.warning("embedding store unavailable for a write, skipped (%s: %s)", type(exc).__name__, exc)
