"""Image embeddings: computing them in batches, and keeping recent ones in a byte-bounded LRU."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass(frozen=True)
class ImageEmbedding:
    """The image encoder's output for one image, with the sizes needed to map masks back."""

    features: torch.Tensor  # (1, C, 64, 64), in the encoder's dtype
    input_size: tuple[int, int]  # (h, w) after resizing the long side to 1024
    original_size: tuple[int, int]  # (h, w) of the image given

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


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


@torch.no_grad()
def encode_images(sam: Sam, images: Sequence[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
    """Run the image encoder on RGB uint8 (H, W, 3) images, `batch_size` images per call.

    Preprocessing is segment_anything's own (resize long side to 1024, normalise, pad), so the
    embeddings equal SamPredictor.set_image's.
    """
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = sam.pixel_mean.device
    dtype = next(sam.image_encoder.parameters()).dtype
    results: list[ImageEmbedding] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs: list[torch.Tensor] = []
        sizes: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for image in chunk:
            resized = torch.as_tensor(transform.apply_image(image), device=device)
            resized = resized.permute(2, 0, 1).contiguous()[None, :, :, :]
            sizes.append(((resized.shape[-2], resized.shape[-1]), (image.shape[0], image.shape[1])))
            inputs.append(sam.preprocess(resized))
        features = sam.image_encoder(torch.cat(inputs).to(dtype))
        results.extend(
            ImageEmbedding(features[i : i + 1].clone(), input_size, original_size)
            for i, (input_size, original_size) in enumerate(sizes)
        )
    return results


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
