"""A faster forward pass for segment_anything's `ImageEncoderViT`, equal up to float rounding.

`accelerate_image_encoder` swaps each transformer `Block` of the encoder for a `FastBlock`
that owns the very same submodules (and so the same parameters and state_dict keys) and
computes the same function with less memory traffic and faster kernels. The patch
embedding, positional embedding and neck are left alone.

Measured on 2 Zen 5 cores (AVX-512 with BF16), vit_b, one 1024 x 1024 image, uncontended
(benchmarks/bench_encoder.py): reference fp32 ~10 s -> 3.3-4.0 s; reference bf16 ~3.9-4.2 s
-> 1.7-2.0 s. Where the time went, and what changed:

* Attention materialised every (heads, tokens, tokens) score matrix whole: 12 x 4096 x 4096
  in the 4 global blocks. Adding the decomposed relative position bias (two broadcast adds)
  and the softmax then streamed these 400-800 MB tensors through memory several times.
  `FastBlock` runs the same ops on chunks of query rows small enough to stay in cache
  (`_SCORE_CHUNK_BYTES`). In 14 x 14 windows the bias is folded into the q @ k^T matmul
  instead (`_fold_rel_pos`), because broadcast adds over 14-element rows are slow. In bf16
  global attention is one fused CPU attention call on the folded q and k (`_attend_folded`):
  1.6x faster with AMX, 3.3x with AVX512-BF16 alone.
* The linear layers went through aten's addmm (MKL for fp32, which on AMD CPUs reaches
  ~200 GFLOP/s where oneDNN reaches ~450). oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`,
  the kernel inductor uses for CPU linears) also fuses the MLP's exact GELU and both
  residual adds, and computes global attention's matmuls, one head at a time.
* The per-head and per-window layout changes are one copy each way instead of two
  (window partition + head split, head merge + window unpartition).

On other devices (CUDA) the attention is instead `scaled_dot_product_attention` with the
relative position bias as an additive mask, made in chunks within models.budget's bound, and
linears are `F.linear`. With `dtype: int8` the linears whose weights quantize.py quantized
compute in int8 on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import Tensor, nn

from sam_fast_serve.models import onednn
from sam_fast_serve.models.budget import items_that_fit
from sam_fast_serve.models.onednn import matmul_transposed
from sam_fast_serve.models.sam1.quantize import Int8Linear, int8_linear

# Bytes of scores per attention chunk on CPU. A chunk's scores and their softmax (16 MiB)
# stay in the L2 + L3 caches of a current server CPU and below glibc's mmap threshold (so
# chunk buffers are reused from the heap, not page-faulted in afresh). Measured on 2 Zen 5
# cores (bench_encoder.py --chunk-sweep): bf16 is equally fast from 1 to 16 MiB, fp32 is
# fastest at 8 MiB (1 MiB: +20%); 32 MiB is 1.5x slower in both. Small chunks also suffer
# most when another process competes for the cores (many short parallel regions).
_SCORE_CHUNK_BYTES = 8 * 2**20


def accelerate_image_encoder(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Replace, in place, every transformer block of `encoder` with a `FastBlock`.

    In: a segment_anything `ImageEncoderViT` on any device and in any dtype (cast it
    first or later: the fast blocks hold the encoder's own modules, so `.to()` and
    `load_state_dict` keep working and the state_dict keys do not change).
    Out: the same `encoder` object, now computing the same function faster. Calling it
    again is a no-op. Run it under `torch.no_grad()` or `torch.inference_mode()` to get
    the oneDNN linears; with gradients enabled the blocks use differentiable `F.linear`.
    """
    for index, block in enumerate(encoder.blocks):
        if not isinstance(block, FastBlock):
            encoder.blocks[index] = FastBlock(block)
    return encoder


class FastBlock(nn.Module):
    """`segment_anything.modeling.image_encoder.Block` with a faster, equivalent forward.

    Holds the block's own `norm1`, `attn`, `norm2` and `mlp` modules under the same names.
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        if not isinstance(block, Block):
            raise TypeError(f"expected a segment_anything image encoder Block, got {type(block).__name__}")
        self.norm1 = block.norm1
        self.attn: Attention = block.attn
        self.norm2 = block.norm2
        self.mlp: MLPBlock = block.mlp
        self.window_size = block.window_size

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) tokens -> (B, H, W, C) tokens, as `Block.forward`."""
        _, height, width, _ = x.shape
        window = (self.window_size, self.window_size) if self.window_size > 0 else (height, width)
        attended = _windowed_attention(self.attn, self.norm1(x), window)
        x = _linear(attended, self.attn.proj, residual=x)
        return _mlp(self.mlp, self.norm2(x), residual=x)


def _windowed_attention(attn: Attention, x: Tensor, window: tuple[int, int]) -> Tensor:
    """`attn` applied to each `window` of x (B, H, W, C), before its output projection.

    Global attention is the case of one window covering the whole (H, W) grid. As in the
    reference, x is zero-padded to whole windows, and the padded tokens' keys and values
    take part in attention; the padded queries' outputs are cropped away.
    """
    batch, height, width, _ = x.shape
    pad_h, pad_w = -height % window[0], -width % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    q, k, v = _split_windows_and_heads(_linear(x, attn.qkv), window, attn.num_heads)
    rel_pos = _relative_position_bias(attn, q, window) if attn.use_rel_pos else None
    out = _attend(q, k, v, attn.scale, rel_pos)
    out = _merge_windows_and_heads(out, (batch, height + pad_h, width + pad_w), window, attn.num_heads)
    return out[:, :height, :width].contiguous() if pad_h or pad_w else out


def _split_windows_and_heads(qkv: Tensor, window: tuple[int, int], num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, Hp, Wp, 3 * C) -> q, k, v, each (B * windows * heads, wh * ww, head_dim).

    One copy does both the reference's `window_partition` and its head split; rows are
    ordered (image, window row, window column, head) like the reference's. The results are
    contiguous (for a single window `reshape` alone would return strided views, on which
    oneDNN's matmul is very slow).
    """
    batch, height, width, channels3 = qkv.shape
    wh, ww = window
    head_dim = channels3 // (3 * num_heads)
    grid = qkv.view(batch, height // wh, wh, width // ww, ww, 3, num_heads, head_dim)
    heads_first = grid.permute(5, 0, 1, 3, 6, 2, 4, 7).contiguous()
    q, k, v = heads_first.view(3, -1, wh * ww, head_dim).unbind(0)
    return q, k, v


def _merge_windows_and_heads(
    out: Tensor, padded_shape: tuple[int, int, int], window: tuple[int, int], num_heads: int
) -> Tensor:
    """Inverse of `_split_windows_and_heads` for one tensor: -> (B, Hp, Wp, heads * head_dim)."""
    batch, height, width = padded_shape
    wh, ww = window
    head_dim = out.shape[-1]
    grid = out.view(batch, height // wh, width // ww, num_heads, wh, ww, head_dim)
    return grid.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, num_heads * head_dim)


def _relative_position_bias(attn: Attention, q: Tensor, window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The decomposed relative position terms of `add_decomposed_rel_pos`.

    In: q (N, wh * ww, head_dim), unscaled. Out: rel_h (N, wh * ww, wh) and rel_w
    (N, wh * ww, ww): the bias of query i and key (kh, kw) is rel_h[:, i, kh] + rel_w[:, i, kw].
    """
    wh, ww = window
    grid_q = q.view(q.shape[0], wh, ww, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, get_rel_pos(wh, wh, attn.rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, get_rel_pos(ww, ww, attn.rel_pos_w))
    return rel_h.reshape(q.shape[0], wh * ww, wh), rel_w.reshape(q.shape[0], wh * ww, ww)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_pos: tuple[Tensor, Tensor] | None) -> Tensor:
    """softmax(scale * q @ k^T + bias) @ v for (N, L, d) inputs, by the fastest way measured for
    their device and dtype."""
    if q.device.type != "cpu":
        return _attend_sdpa(q, k, v, scale, rel_pos)
    if q.dtype == torch.bfloat16 and rel_pos is not None and not _folds_cheaply(q, rel_pos):
        return _attend_folded(q, k, v, scale, rel_pos)
    return _attend_chunked(q, k, v, scale, rel_pos)


def _attend_folded(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_pos: tuple[Tensor, Tensor]) -> Tensor:
    """The attention of `_attend_chunked` as one fused CPU attention kernel, the bias folded into
    q and k (`_fold_rel_pos`), so that neither the scores nor a bias mask ever exist whole.

    The CPU kernel wants one head size for q, k and v, so v gets zero columns, which add nothing.
    In bf16 on 2 Intel cores with AMX, a vit_b global block's attention (12 heads, 4096 tokens):
    169 ms chunked, 104 ms this way (the fold makes q @ k^T 3x wider, and the kernel saves the
    score and softmax passes); with oneDNN limited to AVX512-BF16 (as on AMD Zen 4) 433 -> 133 ms.
    Its error against an fp32 computation is 10x smaller (the bias is summed in the fp32
    accumulator). In 14 x 14 windows it is no faster (a block 10% slower), in fp32 1.8x slower.
    """
    head_dim = v.shape[-1]
    q, k = _fold_rel_pos(q * scale, k, rel_pos)
    v = F.pad(v, (0, q.shape[-1] - head_dim))
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)[:, 0, :, :head_dim]


def _attend_chunked(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_pos: tuple[Tensor, Tensor] | None) -> Tensor:
    """softmax(scale * q @ k^T + bias) @ v, for (N, L, d) inputs, one cache-sized chunk at a time.

    Per chunk these are the reference's ops (matmul, two in-place bias adds, softmax, matmul),
    so in global attention the roundings are the reference's too; only the score matrices
    never exist whole. In small windows the bias is folded into the matmul instead (see
    `_fold_rel_pos`).
    """
    batch, length, _ = q.shape
    q = q * scale
    if rel_pos is not None and _folds_cheaply(q, rel_pos):
        q, k = _fold_rel_pos(q, k, rel_pos)
        rel_pos = None
    v_t = v.transpose(1, 2).contiguous()
    out = q.new_empty(batch, length, v.shape[-1])
    batch_step, query_step = _chunk_shape(batch, length, _SCORE_CHUNK_BYTES // q.element_size())
    for b0 in range(0, batch, batch_step):
        rows = slice(b0, b0 + batch_step)
        for q0 in range(0, length, query_step):
            queries = slice(q0, q0 + query_step)
            scores = matmul_transposed(q[rows, queries], k[rows])
            if rel_pos is not None:
                rel_h, rel_w = rel_pos
                grid = scores.view(*scores.shape[:2], rel_h.shape[-1], rel_w.shape[-1])
                grid.add_(rel_h[rows, queries, :, None]).add_(rel_w[rows, queries, None, :])
            out[rows, queries] = matmul_transposed(scores.softmax(dim=-1), v_t[rows])
    return out


def _folds_cheaply(q: Tensor, rel_pos: tuple[Tensor, Tensor]) -> bool:
    """Whether folding the bias at most doubles the width of q @ k^T: in windows, not in global
    attention."""
    return sum(r.shape[-1] for r in rel_pos) <= q.shape[-1]


def _fold_rel_pos(q: Tensor, k: Tensor, rel_pos: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Widen q and k so that q @ k^T includes the decomposed relative position bias.

    q (N, L, d) -> [q, rel_h, rel_w] and k (N, L, d) -> [k, onehot(kh), onehot(kw)] where key j
    sits at (kh, kw) = divmod(j, kw_size): then (q @ k^T)[i, j] = q_i . k_j + rel_h[i, kh] +
    rel_w[i, kw]. The matmul gets kh + kw wider (at most 2x), and in exchange the two broadcast
    adds over all scores vanish: in 14 x 14 windows, whose rows of 14 elements make those adds
    slow (in bf16 3x slower than the whole widened matmul), this pays; in `_attend_chunked`'s
    64 x 64 global attention it does not, in `_attend_folded`'s fused kernel it does. The bias is
    then summed in the matmul's accumulator, rounded once.
    """
    rel_h, rel_w = rel_pos
    size_h, size_w = rel_h.shape[-1], rel_w.shape[-1]
    eye_h = torch.eye(size_h, dtype=k.dtype, device=k.device)
    eye_w = torch.eye(size_w, dtype=k.dtype, device=k.device)
    onehot = torch.cat([eye_h.repeat_interleave(size_w, dim=0), eye_w.repeat(size_h, 1)], dim=-1)
    return torch.cat([q, rel_h, rel_w], dim=-1), torch.cat([k, onehot.expand(k.shape[0], -1, -1)], dim=-1)


def _chunk_shape(batch: int, length: int, scores: int) -> tuple[int, int]:
    """(batch rows, query rows) per chunk so that a chunk has about `scores` scores."""
    query_rows = max(1, scores // length)
    if query_rows < length:
        return 1, query_rows
    return min(batch, query_rows // length), length


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_pos: tuple[Tensor, Tensor] | None) -> Tensor:
    """The same attention as `_attend_chunked` as fused kernels, with the bias as a mask.

    For accelerators: the scores are never materialised, the (N, L, L) bias mask is, in chunks of
    rows and queries within models.budget's bound (a vit_b global block's is 384 MiB per image in
    bf16).
    """
    if rel_pos is None:
        return _sdpa(q, k, v, None, scale)
    rel_h, rel_w = rel_pos
    batch, length, _ = q.shape
    keys = k.shape[1]
    out = q.new_empty(batch, length, v.shape[-1])
    query_rows = items_that_fit(keys * q.element_size(), q.device)
    batch_step, query_step = _chunk_shape(batch, length, query_rows * keys)
    for b0 in range(0, batch, batch_step):
        rows = slice(b0, b0 + batch_step)
        for q0 in range(0, length, query_step):
            queries = slice(q0, q0 + query_step)
            mask = rel_h[rows, queries, :, None] + rel_w[rows, queries, None, :]
            out[rows, queries] = _sdpa(q[rows, queries], k[rows], v[rows], mask.flatten(2), scale)
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Fused attention of (N, L, d) queries over (N, S, d) keys and values with an (N, L, S) mask."""
    # As (N, 1, L, d): CUDA's fused attention kernels take 4-d inputs only.
    bias = None if mask is None else mask[:, None]
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=scale)[:, 0]


def _mlp(mlp: MLPBlock, x: Tensor, residual: Tensor) -> Tensor:
    """residual + mlp(x), with an exact GELU fused into the first linear when possible."""
    if isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none":
        hidden = _linear(x, mlp.lin1, gelu=True)
    else:
        hidden = mlp.act(_linear(x, mlp.lin1))
    return _linear(hidden, mlp.lin2, residual=residual)


def _linear(x: Tensor, layer: nn.Linear, gelu: bool = False, residual: Tensor | None = None) -> Tensor:
    """[residual +] [gelu](layer(x)); at most one of `gelu` and `residual`.

    An `Int8Linear` (`dtype: int8`, quantize.py) computes in int8 wherever oneDNN runs.
    """
    if isinstance(layer, Int8Linear) and onednn.applies(x, layer.weight):
        return int8_linear(x, layer, gelu=gelu, residual=residual)
    return onednn.linear(x, layer.weight, layer.bias, gelu=gelu, residual=residual)
