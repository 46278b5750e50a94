"""Image embeddings as the engines keep them: one image's encoder output (a family's named tensors),
its key, this worker's byte-bounded LRU of them, and the store that puts a shared tier (Redis, in
server.store) behind that LRU.

The family knows what its embedding holds (its `embedding_layout`); everything here treats it as
named tensors, so an entry of one family can never pass for another's (the shared tier's keys name
the model, and an entry whose tensors do not match the layout is a miss).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sam_fast_serve.common.errors import ServiceUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageEmbedding:
    """The image encoder's output for one image (its family's tensors by name, each with a batch
    dimension of 1, in the encoder's dtype), with the sizes needed to map masks back."""

    tensors: Mapping[str, torch.Tensor]
    input_size: tuple[int, int]  # (h, w) of the image as the encoder saw it, before padding
    original_size: tuple[int, int]  # (h, w) of the image given

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device) -> ImageEmbedding:
        return ImageEmbedding({k: t.to(device) for k, t in self.tensors.items()}, self.input_size, self.original_size)


_KEY_BYTES = 16


def pixel_key(image: np.ndarray) -> str:
    """A key for decoded pixels: the same pixels give the same key whatever file they came from."""
    digest = hashlib.blake2b(digest_size=_KEY_BYTES)
    digest.update(repr((image.shape, image.dtype.str)).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def is_pixel_key(text: str) -> bool:
    """Whether `text` has the form of a `pixel_key` (lowercase hex of its digest)."""
    return len(text) == 2 * _KEY_BYTES and all(c in "0123456789abcdef" for c in text)


class EmbeddingCache:
    """Thread-safe LRU of ImageEmbeddings keyed by `pixel_key`, bounded by total tensor bytes.

    A capacity of 0 disables it: `put` keeps nothing.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        if embedding.nbytes > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = embedding
            self._bytes += embedding.nbytes
            while self._bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


class SharedStoreError(Exception):
    """The shared tier did not answer (in time); the message says what happened."""


class SharedEmbeddings(Protocol):
    """The shared tier of an EmbeddingStore (server.store.RedisEmbeddings). Each method raises
    SharedStoreError when the tier cannot be reached in time."""

    def get(self, key: str) -> ImageEmbedding | None: ...

    def put(self, key: str, embedding: ImageEmbedding) -> None: ...


class EmbeddingStore:
    """The worker's LRU in front of an optional shared Redis store, with hit/miss/error counts
    (`counts`: local_hit, local_miss, shared_hit, shared_miss, shared_error)."""

    def __init__(self, local: EmbeddingCache, shared: SharedEmbeddings | None = None) -> None:
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
        except SharedStoreError as exc:
            self.counts["shared_error"] += 1
            logger.warning("embedding store unavailable for a read (%s)", exc)
            raise ServiceUnavailable(
                "the shared embedding store (Redis) is not answering; retry, or send the image itself"
            ) from exc
        self.counts["shared_hit" if embedding is not None else "shared_miss"] += 1
        if embedding is not None:
            if device is not None:
                embedding = embedding.to(device)
            self.local.put(key, embedding)
        return embedding

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        """Keep `embedding` locally and in the shared store; a shared failure is logged, counted and skipped."""
        self.local.put(key, embedding)
        if self.shared is None:
            return
        try:
            self.shared.put(key, embedding)
        except SharedStoreError as exc:
            self.counts["shared_error"] += 1
            logger.warning("embedding store unavailable for a write, skipped (%s)", exc)


# What a predictor raises (RuntimeError) when asked for masks with no image set.
NO_IMAGE = "An image must be set with .set_image(...) or .set_embedding(...) first."


class EmbeddingKeeper:
    """What a family's predictor does with embeddings, whatever they hold: looked up by pixel key
    (pinned for the batch being served, else in the store) before the encoder runs, and kept in
    the store after it. A predictor sets `store`, `clock`, `device` and `pinned` ({}) and defines
    `encode_images` and `set_embedding`.
    """

    store: EmbeddingStore
    clock: Any  # models.timing.StageClock
    device: torch.device
    pinned: dict[str, ImageEmbedding]
    encoder_calls: int = 0

    def encode_images(self, images: list[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
        """The family's image encoder on RGB uint8 (H, W, 3) images, `batch_size` per call."""
        raise NotImplementedError

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make `embedding` the current image."""
        raise NotImplementedError

    def lookup(self, key: str) -> ImageEmbedding | None:
        """The embedding of the image with `pixel_key` `key`, if it is pinned or cached."""
        pinned = self.pinned.get(key)
        if pinned is not None:
            return pinned
        with self.clock.stage("embedding_store"):
            return self.store.get(key, self.device)

    def fetch(self, key: str) -> ImageEmbedding | None:
        """The stored embedding of `key` (EmbeddingStore.fetch: ServiceUnavailable when the shared
        store cannot answer)."""
        with self.clock.stage("embedding_store"):
            return self.store.fetch(key, self.device)

    def _encode(self, images: list[np.ndarray], keys: list[str], batch_size: int) -> list[ImageEmbedding]:
        """Run the encoder on `images` and keep each embedding under its key."""
        self.encoder_calls += -(-len(images) // batch_size)
        with self.clock.stage("image_encoder"):
            embeddings = self.encode_images(images, batch_size)
        with self.clock.stage("embedding_store"):
            for key, embedding in zip(keys, embeddings, strict=True):
                self.store.put(key, embedding)
        return embeddings

    def pin(self, images: list[np.ndarray], batch_size: int) -> None:
        """Encode the images not yet known, `batch_size` per encoder call, and pin all of them."""
        keys = [pixel_key(image) for image in images]
        # One lookup per distinct image: with a shared store each one may be a Redis read.
        known = {key: self.lookup(key) for key in dict.fromkeys(keys)}
        missing = {key: image for key, image in zip(keys, images) if known[key] is None}
        if missing:
            known.update(zip(missing, self._encode(list(missing.values()), list(missing), batch_size)))
        self.pinned.update({key: embedding for key, embedding in known.items() if embedding is not None})

    def unpin(self) -> None:
        self.pinned.clear()

    def set_pixels(self, image: np.ndarray) -> None:
        """Make the RGB uint8 `image` the current one, reusing a pinned or cached embedding."""
        key = pixel_key(image)
        embedding = self.lookup(key)
        if embedding is None:
            (embedding,) = self._encode([image], [key], 1)
        self.set_embedding(embedding)
