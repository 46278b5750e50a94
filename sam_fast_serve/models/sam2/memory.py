"""SAM 2's memory attention with fewer multiply-adds and the same sums.

Each frame's 4096 tokens attend to the memory bank: the features of the last 7 frames' memories
(4096 tokens each, 64 channels) and the object pointers, about 28,700 tokens. SAM 2's
cross-attention projects every memory token from 64 to 256 channels (`v_proj`) and then averages
them with the attention weights. The weights of each query sum to one, so averaging the
64-channel tokens first and projecting the 4096 averages gives the same result,
W (sum_j a_j m_j) + b = sum_j a_j (W m_j + b): the weighted sum, half of the cross-attention's
work, becomes 4 times cheaper. torch's fused CPU attention needs values as wide as keys, so the
attention runs a block of queries at a time (`attend_in_blocks`): two matrix products and a
softmax, in bf16 where the frame computes in bf16 (on a 2-core Zen 5, one such attention in bf16:
0.66 s by the fused kernel with the values padded to 256 channels, 2.0 s by its fallback with 64,
0.21 s in blocks).
"""

from __future__ import annotations

import torch
from sam2.modeling.position_encoding import apply_rotary_enc
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.modeling.sam2_base import SAM2Base

# Queries a block: a block's scores (256 x ~28,700) take 15 MB in bf16, beside the 15 MB of keys,
# within a 32 MB L3 (2-core Zen 5, bf16, one memory attention: 0.21 s with 256, 0.26 s with 512).
QUERY_BLOCK = 256


def attend_in_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., L, d) queries, (..., S, d) keys and (..., S, e) values
    (e may differ from d), `block` queries at a time. The softmax is in the scores' dtype: in bf16
    its weights are bf16, as a fused kernel's are when it multiplies them with bf16 values (its
    sums are float32 either way); casting a block's scores to float32 and back took 4x the
    softmax itself."""
    # Transposed once: a matrix product on the transposed view copies the keys every block.
    keys = k.transpose(-1, -2).contiguous()
    scale = q.shape[-1] ** -0.5
    blocks = []
    for start in range(0, q.shape[-2], block):
        scores = torch.matmul(q[..., start : start + block, :] * scale, keys)
        blocks.append(torch.matmul(torch.softmax(scores, dim=-1), v))
    return torch.cat(blocks, dim=-2)


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
        out = attend_in_blocks(queries, keys, values.to(queries.dtype))
        return self.out_proj(self.v_proj(out[:, 0]))


def cheaper_memory_attention(net: SAM2Base) -> int:
    """Make each single-head cross-attention of `net`'s memory attention whose values are narrower
    than its output (SAM 2's: 64 against 256) a ValuesAfterAttention (its class changed, its
    weights kept); how many."""
    changed = 0
    for layer in net.memory_attention.layers:
        attention = layer.cross_attn_image
        if (
            type(attention) is RoPEAttention
            and attention.num_heads == 1
            and attention.kv_in_dim < attention.internal_dim
        ):
            attention.__class__ = ValuesAfterAttention
            changed += 1
    return changed
