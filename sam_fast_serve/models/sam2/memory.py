"""SAM 2's memory attention with fewer multiply-adds and the same sums.

Each frame's 4096 tokens attend to the memory bank: the features of the last 7 frames' memories
(4096 tokens each, 64 channels) and the object pointers. The cross-attention projects every memory
token from 64 to 256 channels (`v_proj`) and then averages them with the attention weights. The
weights of each query sum to one, so averaging the 64-channel tokens first and projecting the 4096
averages gives the same result: W (sum_j a_j m_j) + b = sum_j a_j (W m_j + b). That makes the
weighted sum, half of the cross-attention's work, 4 times cheaper.
"""

from __future__ import annotations

from sam2.modeling.sam.transformer import Attention
from sam2.modeling.sam2_base import SAM2Base
from torch import nn


def project_values_after_attention(attention: Attention) -> None:
    """Make `attention` apply its value projection to the attention's output instead of to every
    value token: its forward then computes out_proj(v_proj(attend(q, k, v))). One head only: with
    several, each head's weights average the same tokens differently."""
    assert attention.num_heads == 1, "the value projection moves past the attention for one head only"
    attention.out_proj = nn.Sequential(attention.v_proj, attention.out_proj)
    attention.v_proj = nn.Identity()


def cheaper_memory_attention(net: SAM2Base) -> int:
    """Apply `project_values_after_attention` to every single-head cross-attention of `net`'s memory
    attention whose values are narrower than its output (SAM 2's: 64 against 256); how many."""
    changed = 0
    for layer in net.memory_attention.layers:
        attention = layer.cross_attn_image
        if attention.num_heads == 1 and attention.kv_in_dim < attention.internal_dim:
            project_values_after_attention(attention)
            changed += 1
    return changed
