"""SAM 2's attention by torch's fused kernel, or as matrix products where that kernel is slower.

torch's fused CPU attention (its flash kernel) packs bf16 for AMX tiles; on a CPU with bf16 but no
AMX it runs bf16 no faster than float32. One call, bf16, fused against in blocks (ms, best of 5):

| attention | shape (batch, heads, tokens, channels) | Zen 5, fused | Zen 5, blocks | AMX Xeon, fused | AMX Xeon, blocks |
|---|---|---|---|---|---|
| Hiera, global | 1, 4, 4096, 96 | 168 | 73-100 | 34 | 59 |
| memory, self | 1, 1, 4096, 256 | 105 | 36 | 15 | 27 |
| memory, cross (values 64 wide) | 1, 1, 4096 x 28,736, 256 | 660 | 210 | 97 | 128 |
| Hiera, windows of 14 x 14 | 25, 4, 196, 96 | 12.7 | 5.1 | 3.7 | 4.0 |

(2-core Zen 5 with AVX-512 bf16; 2-core Xeon with AMX.) The fused kernel needs values as wide as
keys: narrower values are padded with zero channels, which attend to zeros and are cut off after.
In float32 it is as fast or faster for values as wide as keys; for the memory's 64-channel values
the blocks pay there, padding being 4x the weighted sum's work (a frame's memory attention in a
worker, freed memory kept (server/runtime.py), with blocks of 256 queries: AMX Xeon 2.46 s in blocks
against 2.54 fused; with torch, oneDNN and MKL held to AVX2 kernels 3.15 against 3.52). In float32
the blocks take 1024 queries and weigh one head's values by oneDNN's linear where it pays
(onednn.py): a memory cross-attention 526 -> 420 ms on a 2-core Xeon with AVX-512 and no bf16
(median of 15, against 256 queries and aten's product; 478 ms with 1024 queries and aten's). On
CUDA the fused kernel is the one.

- `attend(q, k, v)`: softmax(q k^T / sqrt(d)) v, by whichever of the two pays.
- `attend_fused(q, k, v)`: torch's fused attention, for values of any width up to the keys'.
- `attend_in_blocks(q, k, v)`: the matrix products, a block of queries at a time.
- `faster_hiera(net)`: `net`'s Hiera attention computed by `attend` (HieraAttention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam2_base import SAM2Base

from sam_fast_serve.models.onednn import matmul_transposed

__all__ = ["attend", "attend_fused", "attend_in_blocks", "faster_hiera"]

# Queries a block. In bf16 a block's scores (256 x ~28,700 memory tokens) take 15 MB, beside the
# 15 MB of keys, within a 32 MB L3 (2-core Zen 5, bf16, one memory cross-attention: 0.21 s with
# 256, 0.26 s with 512). In float32 (only the memory cross-attention, its values narrower than its
# keys) fewer passes over the 29 MB of keys pay more than scores that stay in the cache (2-core
# Xeon, AVX-512 without bf16, 48 MB L3, median of 15: 510 ms with 256, 473 with 512, 420 with
# 1024, 436 with 2048).
QUERY_BLOCK = 256
FLOAT32_QUERY_BLOCK = 1024
# Whether torch's fused CPU attention computes bf16 with AMX tiles (see above).
FUSED_BF16_ON_CPU = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., L, d) queries, (..., S, d) keys and (..., S, e <= d)
    values: on the CPU matrix products in bf16 or float16 without AMX and in wider dtypes for
    values narrower than keys, torch's fused attention elsewhere."""
    if q.device.type == "cpu":
        reduced = q.dtype in (torch.bfloat16, torch.float16)
        narrow = v.shape[-1] < q.shape[-1]
        if (reduced and not FUSED_BF16_ON_CPU) or (not reduced and narrow):
            return attend_in_blocks(q, k, v)
    return attend_fused(q, k, v)


def attend_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused softmax(q k^T / sqrt(d)) v for (..., L, d) queries, (..., S, d) keys and
    (..., S, e <= d) values, narrower values padded to d channels of zeros and cut back after."""
    width = v.shape[-1]
    if width == q.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v)
    padded = F.pad(v, (0, q.shape[-1] - width))
    return F.scaled_dot_product_attention(q, k, padded)[..., :width]


def attend_in_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., L, d) queries, (..., S, d) keys and (..., S, e) values,
    `block` queries at a time (by default QUERY_BLOCK, FLOAT32_QUERY_BLOCK in float32). The softmax
    is in the scores' dtype: in bf16 its weights are bf16, as a fused kernel's are when it
    multiplies them with bf16 values (its sums are float32 either way); casting a block's scores to
    float32 and back took 4x the softmax itself."""
    if block is None:
        block = FLOAT32_QUERY_BLOCK if q.dtype == torch.float32 else QUERY_BLOCK
    scale = q.shape[-1] ** -0.5

    def attended(queries: torch.Tensor, keys_t: torch.Tensor, values_t: torch.Tensor) -> torch.Tensor:
        return matmul_transposed(torch.softmax(torch.matmul(queries * scale, keys_t), dim=-1), values_t)

    if q.shape[-2] <= block:
        return attended(q, k.transpose(-1, -2), v.transpose(-1, -2))
    # Transposed once: a matrix product on the transposed view copies the keys every block, and
    # one head's transposed values are the weight of oneDNN's linear (onednn.py).
    keys_t, values_t = k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()
    return torch.cat(
        [attended(q[..., start : start + block, :], keys_t, values_t) for start in range(0, q.shape[-2], block)],
        dim=-2,
    )


class HieraAttention(MultiScaleAttention):
    """SAM 2's Hiera attention (its weights, its pooling of the queries where a stage begins)
    computed by `attend`. Made from a MultiScaleAttention by `faster_hiera`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) -> q, k, v each (B, heads, H * W, C / heads)
        batch, height, width, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.q_pool is not None:
            # Max pooling is channel by channel: any order of the channels pools the same.
            grid = q.transpose(-1, -2).reshape(batch, -1, height, width)
            pooled = self.q_pool(grid)
            height, width = pooled.shape[-2:]
            q = pooled.reshape(batch, self.num_heads, -1, height * width).transpose(-1, -2)
        out = attend(q, k, v).transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(out)


def faster_hiera(net: SAM2Base) -> int:
    """Make each MultiScaleAttention of `net`'s image encoder a HieraAttention (its class changed,
    its weights kept); how many."""
    changed = 0
    for module in net.image_encoder.modules():
        if type(module) is MultiScaleAttention:
            module.__class__ = HieraAttention
            changed += 1
    return changed
