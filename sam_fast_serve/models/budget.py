"""How many items a batched step takes at once: one rule, by bytes, for every device.

The steps that grow with a request (masks upsampled to the image, amg.py and SAM 3's resize; the
prompts of one decoder chunk and the masks of one mask-head call, fast_decoder.py; the image
encoder's attention bias off the CPU, sam1/fast_encoder.py) ask `items_that_fit` how many of their
items fit, an item being what one mask, prompt or row of queries adds to the step's largest
intermediate tensor. That tensor holds at most:

- the worker's bound, `set_chunk_bytes` (the handler key `max_chunk_bytes`, server/config.py);
- on CUDA, a CUDA_FREE_SHARE-th of the device memory free when the step begins (the driver's free
  memory and what torch's caching allocator holds unused): a step keeps a few intermediates of
  that size alive at once, and a smaller card, or other workers on it, leave less;
- on the CPU, where a step asks for it, less: sizes chosen there for speed (caches, glibc's mmap
  threshold), each step's own constant.

A single item is taken even where it alone is larger: a mask cannot be split.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "chunk_bytes", "items_that_fit", "set_chunk_bytes"]

DEFAULT_CHUNK_BYTES = 1 << 30
# The intermediates a step keeps alive beside its largest: the decoder's per-prompt image tokens
# (keys, their update, its norm), upsampled float logits beside their thresholded masks.
CUDA_FREE_SHARE = 4

_bound = DEFAULT_CHUNK_BYTES


def set_chunk_bytes(limit: int) -> None:
    """Make `limit` (bytes, >= 1) the worker's bound on a step's largest intermediate: one a process,
    as a worker serves one model."""
    global _bound
    if limit < 1:
        raise ValueError(f"a chunk needs at least 1 byte, got {limit}")
    _bound = limit


def chunk_bytes(device: torch.device) -> int:
    """The bytes a step's largest intermediate on `device` may take now (see above; no CPU speed
    size)."""
    if device.type != "cuda":
        return _bound
    free, _ = torch.cuda.mem_get_info(device)
    unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(_bound, (free + unused_cache) // CUDA_FREE_SHARE)


def items_that_fit(item_bytes: int, device: torch.device, cpu_bytes: int | None = None) -> int:
    """How many items of `item_bytes` each a step on `device` takes at once (at least 1): as many as
    `chunk_bytes(device)` holds, on the CPU at most `cpu_bytes` worth where the step gives it."""
    limit = chunk_bytes(device)
    if device.type == "cpu" and cpu_bytes is not None:
        limit = min(limit, cpu_bytes)
    return max(1, limit // max(1, item_bytes))
