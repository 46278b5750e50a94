"""Binary masks to COCO compressed RLE with pycocotools' C encoder (one call for all masks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(N, H, W) boolean masks, on any device, to N COCO RLEs ({"size": [H, W], "counts": bytes})."""
    if len(masks) == 0:
        return []
    # pycocotools wants (H, W, N) uint8 in Fortran order, which is (N, W, H) in C order: no copy
    # when each mask is stored column-major already (as models.upsampling.by_products makes them).
    columns = masks.cpu().view(torch.uint8).transpose(1, 2).contiguous().numpy()
    # Its encoder needs, for N masks of A pixels, at most 4A bytes of run buffer, 4A of runs per
    # mask (all kept until the end) and 6A of string for one mask at a time.
    reserve((10 + 4 * len(masks)) * masks.shape[1] * masks.shape[2])
    return mask_utils.encode(columns.transpose(2, 1, 0))


def start_rles(masks: torch.Tensor) -> Callable[[], list[dict[str, Any]]]:
    """`encode_masks(masks)` as a call that gives the RLEs. On CUDA the masks are copied, in the
    encoder's column order, to pinned host memory without waiting for the copy, which the call
    waits for: the device goes on with later work meanwhile. Elsewhere they are encoded now."""
    if masks.device.type != "cuda":
        encoded = encode_masks(masks)
        return lambda: encoded
    columns = masks.transpose(1, 2).contiguous()
    host = torch.empty(columns.shape, dtype=columns.dtype, pin_memory=True)
    host.copy_(columns, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(masks.device))

    def rles() -> list[dict[str, Any]]:
        copied.synchronize()
        return encode_masks(host.transpose(1, 2))

    return rles


def rles_in_turn(parts: Iterable[torch.Tensor]) -> Iterator[list[dict[str, Any]]]:
    """The RLEs of each of `parts` ((N, H, W) boolean masks each) in turn, by `start_rles` one part
    ahead: on CUDA the next part is on its way to the host while one is encoded, and at most two
    parts are held in pinned memory."""
    started = (start_rles(part) for part in parts)
    upcoming = next(started, None)
    while upcoming is not None:
        current, upcoming = upcoming, next(started, None)
        yield current()


def reserve(n_bytes: int) -> None:
    """Raise MemoryError now if `n_bytes` cannot be allocated. pycocotools' C code does not check
    its mallocs: a shortage inside it is a segfault that kills the worker (seen with an address
    space limit and a 25-megapixel image), so callers reserve what it will need first."""
    np.empty(n_bytes, dtype=np.uint8)


def rle_areas(rles: list[dict[str, Any]]) -> list[int]:
    """Mask areas of COCO RLEs, one call per RLE: pycocotools 2.0.11's `area` of a list of more
    than 255 RLEs overflows a uint8 ("Python integer 256 out of bounds for uint8")."""
    return [int(mask_utils.area(rle)) for rle in rles]
