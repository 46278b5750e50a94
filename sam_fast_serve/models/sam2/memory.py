"""SAM 2's memory attention with fewer multiply-adds and the same sums.

Each frame's 4096 tokens attend to themselves (self-attention, 256 channels), then to the memory
bank: the features of the last 7 frames' memories (4096 tokens each, 64 channels) and the object
pointers, about 28,700 tokens. SAM 2's cross-attention projects every memory token from 64 to 256
channels (`v_proj`) and then averages them with the attention weights. The weights of each query
sum to one, so averaging the 64-channel tokens first and projecting the 4096 averages gives the
same result, W (sum_j a_j m_j) + b = sum_j a_j (W m_j + b): the weighted sum, half of the
cross-attention's work, becomes 4 times cheaper where it runs as matrix products a block of queries
at a time (attention.py: float32, and bf16 on a CPU without AMX). torch's fused kernel needs values
as wide as keys: there (bf16 with AMX) the 64 channels are padded to 256, as costly as SAM 2's
projected values, and still faster (attention.py's table). The self-attention projects its values
after attending too (no cheaper there, the same sums) so that both go through `attend`.
"""

from __future__ import annotations

import torch
from sam2.modeling.position_encoding import apply_rotary_enc
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.modeling.sam2_base import SAM2Base

from sam_fast_serve.models.sam2.attention import attend


class ValuesAfterAttention(RoPEAttention):
    """A single-head SAM 2 RoPEAttention (its weights, its rotary encoding) that projects the
    values after attending: out_proj(v_proj(attend(rope(q_proj(q)), rope(k_proj(k)), v))). Made
    from a RoPEAttention by `cheaper_memory_attention` (SAM 2's memory attention asks for one)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        # (B, N, C) -> (B, 1 head, N, C)
        queries, keys, values = self.q_proj(q)[:, None], self.k_proj(k)[:, None], v[:, None]
        # The rotations of a square grid of queries, made again when its size or device changes.
        freqs: torch.Tensor = self.freqs_cis  # type: ignore[has-type]  # set untyped by RoPEAttention
        if freqs.shape[0] != queries.shape[-2] or freqs.device != queries.device:
            side = int(queries.shape[-2] ** 0.5)
            freqs = self.freqs_cis = self.compute_cis(end_x=side, end_y=side).to(queries.device)
        rotated = keys.shape[-2] - num_k_exclude_rope
        queries, rotated_keys = apply_rotary_enc(
            queries, keys[:, :, :rotated], freqs_cis=freqs, repeat_freqs_k=self.rope_k_repeat
        )
        keys = torch.cat([rotated_keys, keys[:, :, rotated:]], dim=-2)
        out = attend(queries, keys, values.to(queries.dtype))
        return self.out_proj(self.v_proj(out[:, 0]))


def cheaper_memory_attention(net: SAM2Base) -> int:
    """Make each single-head attention of `net`'s memory attention layers (self and cross, SAM 2's
    are) a ValuesAfterAttention (its class changed, its weights kept); how many."""
    changed = 0
    for layer in net.memory_attention.layers:
        for attention in (layer.self_attn, layer.cross_attn_image):
            if type(attention) is RoPEAttention and attention.num_heads == 1:
                attention.__class__ = ValuesAfterAttention
                changed += 1
    return changed
