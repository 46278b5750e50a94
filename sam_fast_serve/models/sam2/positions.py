"""SAM 2's sine position encodings served from their cache, not copied out of it each time.

SAM 2's PositionEmbeddingSine caches the encoding of each feature-map size, then answers every
call with a batch-sized `repeat` of it, a copy, which both of its callers (the image encoder's
neck and the memory encoder) at once convert to their features' dtype, a second copy. For the
neck's 256 x 256 x 256 map that is 16.7 M values a frame twice over: 61 ms of the image encoder's
~0.9 s (2-core Zen 5, the cached call alone); the higher-resolution encodings are not even read
on the video path (only the 64 x 64 one enters the memory attention).

- `cached_positions(net)`: `net`'s sine position encodings made CachedSinePositions.
- `values_key(*tensors)`: what identifies tensors' current values, for what is kept made from
  weights (trunk.py, neck.py).
"""

from __future__ import annotations

import torch
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam2_base import SAM2Base

__all__ = ["cached_positions", "values_key"]


def values_key(*tensors: torch.Tensor) -> tuple:
    """The dtype, device, storage and version of each tensor: equal as long as none was replaced,
    moved, cast or written in place (load_state_dict writes in place, bumping the version)."""
    return tuple((t.dtype, t.device, t.data_ptr(), t._version) for t in tensors)


class CachedSinePositions(PositionEmbeddingSine):
    """A PositionEmbeddingSine whose answer for (B, C, H, W) features is the cached (C, H, W)
    encoding in their dtype, expanded to B without a copy. Its values are SAM 2's to the bit; it is
    read-only as SAM 2's callers use it (they add it, never write into it)."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-2], x.shape[-1], x.dtype, x.device)
        # Made on first use: the class is swapped onto a built module, whose __init__ made no such cache.
        converted: dict = self.__dict__.setdefault("_converted", {})
        if key not in converted:
            converted[key] = self._pe(1, x.device, *key[:2])[0].to(x.dtype)
        return converted[key][None].expand(x.shape[0], -1, -1, -1)


def cached_positions(net: SAM2Base) -> int:
    """Make each PositionEmbeddingSine of `net` (the image encoder's, the memory encoder's) a
    CachedSinePositions (its class changed, its settings kept); how many."""
    changed = 0
    for module in net.modules():
        if type(module) is PositionEmbeddingSine:
            module.__class__ = CachedSinePositions
            changed += 1
    return changed
