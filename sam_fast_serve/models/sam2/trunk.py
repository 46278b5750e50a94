"""SAM 2's Hiera trunk as served: in the model's compute dtype, its position embedding made once.

Under autocast alone the trunk's residual stream stays float32 (SAM 2 adds its float32 position
embedding to the patches), so each block's residual adds and LayerNorms mix or widen dtypes and each
linear casts its weights again. With the trunk's weights in bf16 the whole stream is bf16: on a
2-core Xeon with AMX the trunk of sam2.1_hiera_tiny at 1024 x 1024 took 0.65 s under autocast and
0.58 s in bf16, its features within 0.1% of autocast's difference from float32 (relative norm of the
difference, 0.0041 against 0.0033 at the first stage, 0.0118 against 0.0116 at the last).
SAM 2 also interpolates the embedding bicubically from its 7 x 7 grid on every call (30 ms a frame
there) and adds it as a permuted view.

- `ServedHiera`: a Hiera whose input is cast to its weights' dtype and whose position embedding is
  kept per grid size.
- `served_trunk(net)`: `net`'s trunk made a ServedHiera; `trunk_in(net, dtype)` casts its weights.
"""

from __future__ import annotations

import torch
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.sam2_base import SAM2Base

from sam_fast_serve.models.sam2.positions import values_key

__all__ = ["ServedHiera", "served_trunk", "trunk_in"]


class ServedHiera(Hiera):
    """A Hiera that computes in its weights' dtype whatever its input's, its position embedding
    for a grid of patches computed by SAM 2's code once (for each grid size, dtype and weights) and
    kept contiguous. Made from a Hiera by `served_trunk`; for inference (the kept embedding is not
    differentiated)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return super().forward(x.to(self.pos_embed.dtype))

    @torch.no_grad()
    def _get_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        key = (*hw, values_key(self.pos_embed))
        # Made on first use: the class is swapped onto a built module, whose __init__ made no such cache.
        kept: dict = self.__dict__.setdefault("_kept_positions", {})
        if key not in kept:
            kept.clear()  # weights or size changed: the old one is stale
            kept[key] = super()._get_pos_embed(hw).contiguous()
        return kept[key]


def served_trunk(net: SAM2Base) -> bool:
    """Make `net`'s Hiera trunk a ServedHiera (its class changed, its weights kept); whether it changed."""
    trunk = net.image_encoder.trunk
    if type(trunk) is not Hiera:
        return False
    trunk.__class__ = ServedHiera
    return True


def trunk_in(net: SAM2Base, dtype: torch.dtype) -> None:
    """Hold `net`'s trunk's weights in `dtype`, the dtype it then computes in (a ServedHiera)."""
    served_trunk(net)
    net.image_encoder.trunk.to(dtype)
