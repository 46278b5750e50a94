"""Exact, fast re-implementation of SAM's mask decoder for many prompts per image (SAM 1's and
SAM 2's: see FastMaskDecoder.__init__ for what SAM 2 adds).

`segment_anything.modeling.MaskDecoder.predict_masks` repeats the image embedding
once per prompt and then projects all 4096 image tokens in every attention layer,
for every prompt. With a handful of tokens per prompt (5 output tokens, 6 in SAM 2, plus 2-4
sparse prompt tokens) almost all of that work is either shared between prompts or
can be avoided by reassociating the matrix products. `FastMaskDecoder` computes the
same function (equal up to floating-point rounding) as follows:

1. Per-image sharing. Until the first image->token attention updates them, the
   image tokens are identical for every prompt, so everything the first block
   derives from them alone (the keys/values of its token->image attention and the
   queries of its image->token attention) is computed once in `prepare_image`; so
   are the projections of the positional encoding used by the later attentions.
2. Folded attention wherever the image tokens differ per prompt. A per-head
   projection W_h of the image tokens is never computed: it is moved to the token
   side (e.g. q_h . (W_h x) = (W_h^T q_h) . x), so per prompt each product with the
   4096 image tokens has heads * t columns (8 * 7 = 56 for a point prompt) instead
   of a 4096 x C x 128 projection followed by the attention itself.
3. The mask head is separate: `run_transformer` returns IoU predictions for all
   prompts, `mask_logits` runs output upscaling and the hypernetworks only for the
   prompts the caller selects.

The prompt batch is processed in chunks so that each (prompts, 4096, C) activation stays
within models.budget's bound (on CPU also `_CPU_CHUNK_BYTES`), and the mask head upscales the
selected prompts' image tokens a group at a time, as many as that bound holds (on CPU one,
`_MASK_HEAD_CPU_BYTES`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor, nn

from sam_fast_serve.models import onednn
from sam_fast_serve.models.budget import items_that_fit

# Each (prompts, HW, C) activation of a chunk is at most this big: a whole batch of 64
# prompts in bf16. Fewer, larger chunks mean fewer parallel regions, each of which waits
# for every thread: beside another busy process, chunks of 8 prompts made the decoder
# 2-4x slower than chunks of 64. Blocks this big are page-faulted in afresh at every
# allocation unless freed memory is kept (server.runtime.keep_freed_memory, which MaskService.load
# and the benchmarks call): with it, 64-prompt chunks are also a little faster when the
# machine is quiet (a 512 x 512 photo at 0% kept: 6.0 -> 5.2 s per image).
_CPU_CHUNK_BYTES = 128 * 2**20
# The mask head on the CPU upscales one prompt at a time (0 bytes: one item): groups of 2 to 8
# measured no faster (fp32, 2 Zen 3 cores, 64 prompts x 3 masks and 73 more pairs: 1.12-1.16 s
# whatever the group).
_MASK_HEAD_CPU_BYTES = 0


@dataclass(frozen=True)
class _CrossAttentionWeights:
    """The weights of one cross `Attention` module, arranged for folding.

    `*_heads` tensors are (heads, d, C): row `j` of head `h` is the projection row
    `h * d + j` (for `out_heads`: column `h * d + j` of the output projection).
    Query weights are pre-multiplied by the softmax scale 1 / sqrt(d).
    """

    num_heads: int
    q_w: Tensor  # (heads * d, C), scaled
    q_b: Tensor  # (heads * d,), scaled
    k_w: Tensor  # (heads * d, C)
    k_b: Tensor  # (heads * d,)
    v_w: Tensor  # (heads * d, C)
    v_b: Tensor  # (heads * d,)
    out_w: Tensor  # (C, heads * d)
    out_b: Tensor  # (C,)
    q_heads: Tensor  # (heads, d, C), scaled
    k_heads: Tensor  # (heads, d, C)
    v_heads: Tensor  # (heads, d, C)
    out_heads: Tensor  # (heads, d, C)

    @classmethod
    def from_module(cls, attn: Attention, dtype: torch.dtype) -> _CrossAttentionWeights:
        """Derives the weights from `attn` (in float32 for accuracy), stored in `dtype`."""
        heads = attn.num_heads
        head_dim = attn.internal_dim // heads
        scale = 1.0 / math.sqrt(head_dim)

        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype).contiguous()

        def per_head(w: Tensor) -> Tensor:
            return cast(w.detach().float().reshape(heads, head_dim, -1))

        q_w = attn.q_proj.weight.float() * scale
        return cls(
            num_heads=heads,
            q_w=cast(q_w),
            q_b=cast(attn.q_proj.bias.float() * scale),
            k_w=cast(attn.k_proj.weight),
            k_b=cast(attn.k_proj.bias),
            v_w=cast(attn.v_proj.weight),
            v_b=cast(attn.v_proj.bias),
            out_w=cast(attn.out_proj.weight),
            out_b=cast(attn.out_proj.bias),
            q_heads=per_head(q_w),
            k_heads=per_head(attn.k_proj.weight),
            v_heads=per_head(attn.v_proj.weight),
            out_heads=per_head(attn.out_proj.weight.t()),
        )

    @property
    def head_dim(self) -> int:
        return self.q_w.shape[0] // self.num_heads


@dataclass(frozen=True)
class _UpscalingWeights:
    """`MaskDecoder.output_upscaling` (two 2x2/stride-2 transposed convolutions) as
    per-pixel linear maps.

    A 2x2 stride-2 transposed convolution maps each input pixel independently to a
    2x2 block of output pixels, i.e. it is a linear layer C_in -> 4 * C_out whose
    outputs are ordered (dy, dx, channel). Applying both in this form leaves the
    pixels in (y, x, dy, dx, dY, dX) order; only the final mask logits are permuted
    back to image order.
    """

    w1: Tensor  # (4 * C1, C)
    b1: Tensor  # (4 * C1,)
    norm_w: Tensor  # (C1,): LayerNorm2d over the C1 channels
    norm_b: Tensor  # (C1,)
    norm_eps: float
    act1: nn.Module
    w2: Tensor  # (4 * C2, C1)
    b2: Tensor  # (4 * C2,)
    act2: nn.Module

    @classmethod
    def from_module(cls, upscaling: nn.Sequential) -> _UpscalingWeights:
        """Reads the layers of `upscaling` (already in the target dtype)."""
        conv1, norm, act1, conv2, act2 = upscaling
        for conv in (conv1, conv2):
            if (
                not isinstance(conv, nn.ConvTranspose2d)
                or conv.bias is None
                or tuple(conv.kernel_size) != (2, 2)
                or tuple(conv.stride) != (2, 2)
            ):
                raise NotImplementedError("output_upscaling must use 2x2, stride-2 transposed convolutions")
        assert isinstance(conv1, nn.ConvTranspose2d) and isinstance(conv2, nn.ConvTranspose2d)
        assert conv1.bias is not None and conv2.bias is not None
        norm_w, norm_b = (p.detach() for p in norm.parameters())  # LayerNorm2d: weight, then bias
        return cls(
            w1=_pixelwise_weight(conv1),
            b1=conv1.bias.detach().repeat(4),
            norm_w=norm_w,
            norm_b=norm_b,
            norm_eps=float(norm.eps),  # type: ignore[arg-type]  # LayerNorm2d.eps is a float
            act1=act1,
            w2=_pixelwise_weight(conv2),
            b2=conv2.bias.detach().repeat(4),
            act2=act2,
        )


def _pixelwise_weight(conv: nn.ConvTranspose2d) -> Tensor:
    """(C_in, C_out, 2, 2) transposed-conv weight -> (4 * C_out, C_in) with rows (dy, dx, C_out)."""
    return conv.weight.detach().permute(2, 3, 1, 0).reshape(-1, conv.in_channels).contiguous()


@dataclass(frozen=True)
class ImageState:
    """Everything the prompts of one image share, computed by `prepare_image`.

    Shapes use HW = H * W image tokens, C channels, and `heads` heads of dim `d` in
    the cross attentions. All tensors are in the decoder's dtype.
    """

    size: tuple[int, int]  # (H, W) of the image embedding
    src: Tensor  # (HW, C): image embedding + dense prompt embedding
    # Per token->image attention (each block's, then the final one), (heads, d, HW):
    # the first projects src + pe, the others only pe (their keys are per prompt).
    image_keys: tuple[Tensor, ...]
    first_values: Tensor  # (heads, HW, d): first token->image attention values
    # Per image->token attention (each block's), (heads, d, HW), scaled queries: the
    # first projects src + pe, the others only pe (their image tokens are per prompt).
    image_queries: tuple[Tensor, ...]
    # SAM 2: the high-resolution features its upscaling adds after each transposed
    # convolution, in the pixel order of the pixelwise form: (HW * 4, C1), (HW * 16, C2).
    high_res: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class DecodedTokens:
    """Transformer outputs for a batch of B prompts, from `run_transformer`.

    `iou_pred` covers every mask token; `mask_tokens` and `src` are what
    `mask_logits` needs to make masks for any subset of the prompts.
    """

    iou_pred: Tensor  # (B, num_mask_tokens) float32
    mask_tokens: Tensor  # (B, num_mask_tokens, C) transformer outputs, decoder dtype
    src: tuple[Tensor, ...]  # B tensors (HW, C): the transformer's image tokens per prompt
    size: tuple[int, int]  # (H, W) of the image embedding
    high_res: tuple[Tensor, Tensor] | None = None  # the image's ImageState.high_res


def no_mask_dense(prompt_encoder: Any) -> Tensor:
    """The dense prompt embedding of a prompt without a mask, (1, C, H, W): what a SAM 1 or SAM 2
    prompt encoder gives every prompt, hence what `prepare_image` shares."""
    weight: Tensor = prompt_encoder.no_mask_embed.weight
    height, width = prompt_encoder.image_embedding_size
    return weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)


def _project_heads(x: Tensor, weight: Tensor, bias: Tensor, num_heads: int) -> Tensor:
    """Projects (HW, C) image tokens to per-head (heads, d, HW)."""
    projected = F.linear(x, weight, bias)  # (HW, heads*d)
    return projected.view(x.shape[0], num_heads, -1).permute(1, 2, 0).contiguous()


def _to_heads(x: Tensor, num_heads: int) -> Tensor:
    """(b, t, heads * d) -> (heads, b * t, d)."""
    b, t, c = x.shape
    d = c // num_heads
    return x.view(b, t, num_heads, d).permute(2, 0, 1, 3).reshape(num_heads, b * t, d)


def _spread_heads(x: Tensor, w_heads: Tensor) -> Tensor:
    """Per-head coefficients times per-head matrices: (b, t, heads*d), (heads, d, C) -> (b, heads*t, C).

    Row (h, t) of the result is sum_j x[b, t, h*d + j] * w_heads[h, j].
    """
    b, t, _ = x.shape
    heads, d, c = w_heads.shape
    return torch.einsum("bthj,hjc->bhtc", x.view(b, t, heads, d), w_heads).reshape(b, heads * t, c)


def _gather_heads(y: Tensor, w_heads: Tensor) -> Tensor:
    """Adjoint of `_spread_heads`: (b, heads*t, C), (heads, d, C) -> (b, t, heads*d)."""
    b, rows, c = y.shape
    heads, d, _ = w_heads.shape
    out = torch.einsum("bhtc,hjc->bthj", y.view(b, heads, rows // heads, c), w_heads)
    return out.reshape(b, rows // heads, heads * d)


def _head_scores(x: Tensor, image_side: Tensor) -> Tensor:
    """Per-head dot products of token-side and image-side vectors.

    x: (b, t, heads*d); image_side: (heads, d, HW). Returns (b, heads*t, HW) with
    rows ordered (head, token).
    """
    b, t, _ = x.shape
    heads, _, hw = image_side.shape
    scores = torch.bmm(_to_heads(x, heads), image_side)  # (heads, b*t, HW)
    return scores.view(heads, b, t, hw).transpose(0, 1).reshape(b, heads * t, hw)


def _head_outputs(w: _CrossAttentionWeights, tokens: Tensor) -> Tensor:
    """Image->token attention values already passed through the output projection.

    Returns (b, heads*t, C) rows V_h[t] @ Wout_h^T + bout / heads. Each image token's
    attention weights sum to 1 per head, i.e. to `heads` over all rows, so the
    spread bias adds exactly `bout` to the attention output.
    """
    values = F.linear(tokens, w.v_w, w.v_b)
    return _spread_heads(values, w.out_heads) + w.out_b / w.num_heads


def _token_to_image_first(w: _CrossAttentionWeights, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Token->image attention of the first block, whose keys/values are per image.

    queries: (b, t, C) tokens with positional encoding; keys: (heads, d, HW) and
    values: (heads, HW, d) projected image tokens. Returns (b, t, C).
    """
    b, t, _ = queries.shape
    heads, d = w.num_heads, w.head_dim
    q = _to_heads(F.linear(queries, w.q_w, w.q_b), heads)  # (heads, b*t, d)
    attn = torch.bmm(q, keys).softmax(dim=-1)  # (heads, b*t, HW)
    out = torch.bmm(attn, values)  # (heads, b*t, d)
    out = out.view(heads, b, t, d).permute(1, 2, 0, 3).reshape(b, t, heads * d)
    return F.linear(out, w.out_w, w.out_b)


def _token_to_image_folded(w: _CrossAttentionWeights, queries: Tensor, keys: Tensor, pe_keys: Tensor) -> Tensor:
    """Token->image attention with per-prompt image tokens, never projecting them.

    With q_h = (Wq_h q + bq_h) / sqrt(d), the scores against keys + pe are
    (Wk_h^T q_h) . keys + q_h . (Wk_h pe + bk_h): a product with the raw image tokens
    plus one with keys projected once per image. The output is Wv_h (A_h @ keys) + bv_h
    per head (rows of A_h sum to 1), then the output projection.
    queries: (b, t, C) with positional encoding; keys: (b, HW, C) without it;
    pe_keys: (heads, d, HW). Returns (b, t, C).
    """
    q = F.linear(queries, w.q_w, w.q_b)  # (b, t, heads*d), scaled
    scores = _head_scores(q, pe_keys).baddbmm_(_spread_heads(q, w.k_heads), keys.transpose(1, 2))
    pooled = torch.bmm(scores.softmax(dim=-1), keys)  # (b, heads*t, C)
    values = _gather_heads(pooled, w.v_heads) + w.v_b  # (b, t, heads*d)
    return F.linear(values, w.out_w, w.out_b)


def _image_to_token_attention(
    w: _CrossAttentionWeights, tokens_pe: Tensor, image_queries: Tensor, keys: Tensor | None
) -> Tensor:
    """Attention weights of image tokens over prompt tokens, (b, heads*t, HW).

    With k_h = Wk_h t + bk_h, the scores of image token x + pe are
    (Wq_h (x + pe) + bq_h) . k_h / sqrt(d): `image_queries` (heads, d, HW) holds the
    projection of what is shared by all prompts, and the per-prompt part `keys`
    (b, HW, C), if any, enters as keys . (Wq_h^T k_h) / sqrt(d).
    tokens_pe: (b, t, C) tokens with positional encoding.
    """
    b, t, _ = tokens_pe.shape
    heads, hw = w.num_heads, image_queries.shape[-1]
    k = F.linear(tokens_pe, w.k_w, w.k_b)  # (b, t, heads*d)
    scores = _head_scores(k, image_queries)
    if keys is not None:
        scores.baddbmm_(_spread_heads(k, w.q_heads), keys.transpose(1, 2))
    # Each image token's softmax runs over the t tokens of each head.
    return scores.view(b, heads, t, hw).softmax(dim=2).view(b, heads * t, hw)


def _self_attention(block: TwoWayAttentionBlock, queries: Tensor, query_pe: Tensor) -> Tensor:
    """The token self-attention sub-block (with its norm) exactly as the reference block."""
    if block.skip_first_layer_pe:
        return block.norm1(block.self_attn(q=queries, k=queries, v=queries))
    q = queries + query_pe
    return block.norm1(queries + block.self_attn(q=q, k=q, v=queries))


def _mlp(block: TwoWayAttentionBlock, queries: Tensor) -> Tensor:
    """The token MLP sub-block (with its norm)."""
    return block.norm3(queries + block.mlp(queries))


class FastMaskDecoder:
    """`MaskDecoder.predict_masks` for many prompts on one image, computed much faster
    in three stages: per image, per batch of prompts, per selected mask.

    Usage::

        fast = FastMaskDecoder(sam.mask_decoder, dtype=torch.bfloat16)
        state = fast.prepare_image(image_embeddings, image_pe, dense_embeddings[:1])
        tokens = fast.run_transformer(state, sparse_embeddings)      # tokens.iou_pred
        logits = fast.mask_logits(tokens, prompt_idx, mask_idx)      # (K, 256, 256)

    Weights live on the device of `mask_decoder`; inputs must be on that device.
    """

    def __init__(
        self,
        mask_decoder: MaskDecoder,
        dtype: torch.dtype = torch.float32,
        prompts_per_chunk: int | None = None,
    ) -> None:
        """Derives, once, the weights used by the fast path from `mask_decoder`.

        mask_decoder: a SAM `MaskDecoder` (its transformer a `TwoWayTransformer`), or SAM 2's,
            whose tokens start with an object-score token (`pred_obj_scores`) and whose
            upscaling adds two high-resolution feature maps (`use_high_res_features`): both
            are per image or per token, so everything above still folds; it is not modified. Its token-only submodules (self-attention, MLPs, LayerNorms,
            IoU head, hypernetworks) are used directly when `dtype` matches its
            parameters, or from a copy cast to `dtype`.
        dtype: torch.float32 or torch.bfloat16, for weights and activations.
        prompts_per_chunk: prompts processed together by `run_transformer`; by default
            as many as keep one (prompts, HW, C) activation within models.budget's bound
            (on CPU at most 128 MiB).
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        param_dtype = next(mask_decoder.parameters()).dtype
        decoder = mask_decoder if param_dtype == dtype else copy.deepcopy(mask_decoder).to(dtype)
        self.dtype = dtype
        self.num_mask_tokens: int = decoder.num_mask_tokens
        self.prompts_per_chunk = prompts_per_chunk
        self._decoder = decoder
        transformer = decoder.transformer
        self._blocks: list[TwoWayAttentionBlock] = list(transformer.layers)
        self._token_to_image = [
            _CrossAttentionWeights.from_module(b.cross_attn_token_to_image, dtype) for b in self._blocks
        ]
        self._image_to_token = [
            _CrossAttentionWeights.from_module(b.cross_attn_image_to_token, dtype) for b in self._blocks
        ]
        self._final_attn = _CrossAttentionWeights.from_module(transformer.final_attn_token_to_image, dtype)
        self._upscaling = _UpscalingWeights.from_module(decoder.output_upscaling)
        # SAM 2 puts its object-score token first; the IoU token follows, then the mask tokens.
        leading = [decoder.obj_score_token.weight] if getattr(decoder, "pred_obj_scores", False) else []
        self._iou_index = len(leading)
        self._uses_high_res = bool(getattr(decoder, "use_high_res_features", False))
        self._output_tokens = torch.cat(
            [*leading, decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0
        ).detach()

    @torch.inference_mode()
    def prepare_image(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        dense_embeddings: Tensor,
        high_res_features: tuple[Tensor, Tensor] | None = None,
    ) -> ImageState:
        """Computes once per image everything all prompts share.

        image_embeddings: (1, C, H, W) image encoder output.
        image_pe: (1, C, H, W) positional encoding (`prompt_encoder.get_dense_pe()`).
        dense_embeddings: (1, C, H, W) dense prompt embedding, the same for every prompt
            (without mask inputs the prompt encoder returns one row expanded over the
            batch: pass `dense_embeddings[:1]`).
        high_res_features: SAM 2's (1, C2, 4H, 4W) and (1, C1, 2H, 2W) feature maps (its
            `high_res_features`, the finer first), for a decoder that uses them.
        Returns an `ImageState` in the decoder's dtype.
        """
        for name, x in (
            ("image_embeddings", image_embeddings),
            ("image_pe", image_pe),
            ("dense_embeddings", dense_embeddings),
        ):
            if x.dim() != 4 or x.shape[0] != 1:
                raise ValueError(f"{name} must have shape (1, C, H, W), got {tuple(x.shape)}")
        if (high_res_features is not None) != self._uses_high_res:
            needs = "needs" if self._uses_high_res else "takes no"
            raise ValueError(f"this decoder {needs} high_res_features")
        h, w = image_embeddings.shape[-2:]
        src = self._tokens(image_embeddings + dense_embeddings)
        pe = self._tokens(image_pe)
        src_pe = src + pe
        t2i = self._token_to_image + [self._final_attn]
        first = t2i[0]
        values = F.linear(src, first.v_w, first.v_b).view(-1, first.num_heads, first.head_dim)
        return ImageState(
            size=(h, w),
            src=src,
            image_keys=tuple(
                _project_heads(src_pe if i == 0 else pe, a.k_w, a.k_b, a.num_heads) for i, a in enumerate(t2i)
            ),
            first_values=values.transpose(0, 1).contiguous(),
            image_queries=tuple(
                _project_heads(src_pe if i == 0 else pe, a.q_w, a.q_b, a.num_heads)
                for i, a in enumerate(self._image_to_token)
            ),
            high_res=None if high_res_features is None else self._pixelwise_high_res(high_res_features, (h, w)),
        )

    def _pixelwise_high_res(self, features: tuple[Tensor, Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """SAM 2's feat_s0 (1, C2, 4H, 4W) and feat_s1 (1, C1, 2H, 2W) in the pixel order of
        `_prompt_masks`' two stages: (y, x, dy, dx) rows of C1, (y, x, dy, dx, dY, dX) rows of C2."""
        h, w = size
        feat_s0, feat_s1 = features
        c1, c2 = feat_s1.shape[1], feat_s0.shape[1]
        if feat_s0.shape != (1, c2, 4 * h, 4 * w) or feat_s1.shape != (1, c1, 2 * h, 2 * w):
            raise ValueError(
                f"high_res_features must be (1, C2, {4 * h}, {4 * w}) and (1, C1, {2 * h}, {2 * w}), "
                f"got {tuple(feat_s0.shape)} and {tuple(feat_s1.shape)}"
            )
        # feat_s1[c, 2y + dy, 2x + dx]; feat_s0[c, 4y + 2dy + dY, 4x + 2dx + dX].
        s1 = feat_s1[0].reshape(c1, h, 2, w, 2).permute(1, 3, 2, 4, 0).reshape(h * w * 4, c1)
        s0 = feat_s0[0].reshape(c2, h, 2, 2, w, 2, 2).permute(1, 4, 2, 5, 3, 6, 0).reshape(h * w * 16, c2)
        return s1.to(self.dtype).contiguous(), s0.to(self.dtype).contiguous()

    @torch.inference_mode()
    def run_transformer(self, state: ImageState, sparse_embeddings: Tensor) -> DecodedTokens:
        """Runs the two-way transformer and the IoU head for a batch of prompts.

        state: from `prepare_image` for the image the prompts belong to.
        sparse_embeddings: (B, N, C) sparse prompt embeddings (any float dtype; cast to
            the decoder's dtype).
        Returns `DecodedTokens` with `iou_pred` (B, num_mask_tokens) float32 for all
        mask tokens (index 0 is the single-mask output, 1.. the multimask outputs).
        """
        b = sparse_embeddings.shape[0]
        output_tokens = self._output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse_embeddings.to(self.dtype)], dim=1)
        iou_pred: list[Tensor] = []
        mask_tokens: list[Tensor] = []
        src: list[Tensor] = []
        for chunk in tokens.split(self._chunk_size(state)):
            outputs, keys = self._transformer(state, chunk)
            iou_pred.append(self._decoder.iou_prediction_head(outputs[:, self._iou_index]).float())
            mask_tokens.append(outputs[:, self._iou_index + 1 :])
            src.extend(keys.unbind(0))
        return DecodedTokens(
            iou_pred=torch.cat(iou_pred),
            mask_tokens=torch.cat(mask_tokens),
            src=tuple(src),
            size=state.size,
            high_res=state.high_res,
        )

    @torch.inference_mode()
    def mask_logits(self, tokens: DecodedTokens, prompt_idx: Tensor, mask_idx: Tensor) -> Tensor:
        """Low-resolution mask logits for K selected (prompt, mask token) pairs.

        tokens: from `run_transformer`.
        prompt_idx: (K,) integer indices into the prompt batch, any order, repeats allowed.
        mask_idx: (K,) integer mask token indices in [0, num_mask_tokens).
        Returns (K, 4H, 4W) float32 (256 x 256 for SAM), equal to
        `predict_masks(...)[0][prompt_idx, mask_idx]`. The output upscaling runs once
        per distinct selected prompt, in groups (`_upscaled`), the hypernetworks once per pair.
        """
        h, w = tokens.size
        device = tokens.mask_tokens.device
        # The one wait for the device: the selection's layout is planned on the host.
        layout = _MaskLayout.of(prompt_idx.tolist(), mask_idx.tolist(), self.num_mask_tokens, device)
        prompt_idx, mask_idx = prompt_idx.to(device), mask_idx.to(device)
        hyper = self._hypernetworks(tokens.mask_tokens[prompt_idx, mask_idx], layout.rows_of_token)

        # A row past the selection takes the logits of empty slots.
        out = torch.empty((len(mask_idx) + 1, 4 * h, 4 * w), dtype=torch.float32, device=device)
        for group in layout.groups(items_that_fit(self._upscaled_bytes(tokens), device, _MASK_HEAD_CPU_BYTES)):
            prompts = len(group.prompts)
            upscaled = self._upscaled(_stacked([tokens.src[p] for p in group.prompts]), (h, w), tokens.high_res)
            slots = hyper.new_zeros((prompts * group.width, hyper.shape[-1]))
            slots[group.filled] = hyper[group.rows]
            logits = torch.bmm(slots.view(prompts, group.width, -1), upscaled.transpose(1, 2))
            out.index_copy_(0, group.destination, logits.view(-1, 4 * h, 4 * w).float())
        return out[:-1]

    def _tokens(self, x: Tensor) -> Tensor:
        """(1, C, H, W) -> (HW, C) in the decoder's dtype."""
        return x[0].flatten(1).t().to(self.dtype).contiguous()

    def _chunk_size(self, state: ImageState) -> int:
        """Prompts per chunk in `run_transformer`: `prompts_per_chunk`, else as many (HW, C) image
        token sets as models.budget fits (see `_CPU_CHUNK_BYTES`)."""
        if self.prompts_per_chunk is not None:
            return self.prompts_per_chunk
        return items_that_fit(state.src.numel() * state.src.element_size(), state.src.device, _CPU_CHUNK_BYTES)

    def _transformer(self, state: ImageState, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """TwoWayTransformer.forward for (b, T, C) tokens.

        Returns the final output tokens (b, [object score,] IoU and mask tokens, C) and the
        image tokens (b, HW, C).
        """
        # Block 0: the image tokens are still the same for every prompt.
        block, t2i, i2t = self._blocks[0], self._token_to_image[0], self._image_to_token[0]
        queries = _self_attention(block, tokens, tokens)
        attn_out = _token_to_image_first(t2i, queries + tokens, state.image_keys[0], state.first_values)
        queries = _mlp(block, block.norm2(queries + attn_out))
        attn = _image_to_token_attention(i2t, queries + tokens, state.image_queries[0], keys=None)
        keys = block.norm4(torch.baddbmm(state.src, attn.transpose(1, 2), _head_outputs(i2t, queries)))

        for i in range(1, len(self._blocks)):
            block, t2i, i2t = self._blocks[i], self._token_to_image[i], self._image_to_token[i]
            queries = _self_attention(block, queries, tokens)
            attn_out = _token_to_image_folded(t2i, queries + tokens, keys, state.image_keys[i])
            queries = _mlp(block, block.norm2(queries + attn_out))
            attn = _image_to_token_attention(i2t, queries + tokens, state.image_queries[i], keys)
            keys = block.norm4(keys.baddbmm_(attn.transpose(1, 2), _head_outputs(i2t, queries)))

        # Only the output tokens are read after the final attention, and it treats
        # tokens independently: the sparse prompt tokens can be dropped.
        n = self._iou_index + 1 + self.num_mask_tokens
        queries, tokens = queries[:, :n], tokens[:, :n]
        attn_out = _token_to_image_folded(self._final_attn, queries + tokens, keys, state.image_keys[-1])
        return self._decoder.transformer.norm_final_attn(queries + attn_out), keys

    def _hypernetworks(self, mask_tokens: Tensor, rows_of_token: tuple[Tensor, ...]) -> Tensor:
        """(K, C) mask token outputs -> (K, C2), each through its mask token's MLP (`rows_of_token`:
        the rows of each token, from `_MaskLayout`)."""
        mlps = self._decoder.output_hypernetworks_mlps
        out = mask_tokens.new_empty((mask_tokens.shape[0], mlps[0].layers[-1].out_features))
        for mlp, rows in zip(mlps, rows_of_token, strict=True):
            if len(rows):
                out[rows] = mlp(mask_tokens[rows])
        return out

    def _upscaled_bytes(self, tokens: DecodedTokens) -> int:
        """The bytes of one prompt's largest mask-head intermediate: its (16HW, C2) upscaled pixels."""
        h, w = tokens.size
        channels = self._upscaling.w2.shape[0] // 4  # (dy, dx, C2) rows
        return 16 * h * w * channels * tokens.mask_tokens.element_size()

    def _upscaled(self, src: Tensor, size: tuple[int, int], high_res: tuple[Tensor, Tensor] | None) -> Tensor:
        """Output upscaling of P prompts' (P, HW, C) image tokens (plus SAM 2's high-resolution
        features): (P, 16HW, C2) pixels in image order, rows of 4W pixels, in the decoder's dtype."""
        up = self._upscaling
        h, w = size
        prompts = src.shape[0]
        # SAM 2's features are added in the linears' own output layout, fused where oneDNN runs.
        first, second = (
            (None, None) if high_res is None else (high_res[0].view(1, h * w, -1), high_res[1].view(1, h * w * 4, -1))
        )
        x = onednn.linear(src, up.w1, up.b1, residual=_expanded(first, prompts))
        x = x.view(prompts, h * w * 4, -1)  # pixels (y, x, dy, dx)
        x = up.act1(F.layer_norm(x, x.shape[-1:], up.norm_w, up.norm_b, up.norm_eps))
        x = onednn.linear(x, up.w2, up.b2, residual=_expanded(second, prompts))
        x = x.view(prompts, h * w * 16, -1)  # (y, x, dy, dx, dY, dX)
        # Pixel (y, x, dy, dx, dY, dX) is row 4y + 2dy + dY and column 4x + 2dx + dX: reordering the
        # pixels' C2-channel rows here moves contiguous runs of 2 C2 values, where reordering the
        # logits afterwards moved single values (a third of the mask head's time).
        x = up.act2(x).view(prompts, h, w, 2, 2, 2, 2, -1).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(prompts, h * w * 16, -1)


def _stacked(tensors: list[Tensor]) -> Tensor:
    """`torch.stack(tensors)`, without a copy for one tensor."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _expanded(features: Tensor | None, prompts: int) -> Tensor | None:
    """SAM 2's (1, pixels, C) features of the image for each of `prompts` prompts (a view)."""
    return None if features is None else features.expand(prompts, -1, -1)


@dataclass(frozen=True)
class _MaskGroup:
    """Prompts whose masks one batched mask-head call makes, `width` slots each (the most pairs
    any of them has): slot `filled[i]` (prompt-major) holds the pair of output row `rows[i]`, and
    each slot's logits go to output row `destination[slot]` (a spare row for an empty slot)."""

    prompts: list[int]
    width: int
    rows: Tensor
    filled: Tensor
    destination: Tensor


@dataclass(frozen=True)
class _MaskLayout:
    """The K (prompt, mask token) pairs `mask_logits` makes, planned on the host: each distinct
    prompt's rows of the output in order, and the rows of each mask token (on `device`)."""

    count: int
    rows_of_prompt: dict[int, list[int]]
    rows_of_token: tuple[Tensor, ...]
    device: torch.device

    @classmethod
    def of(cls, prompts: list[int], tokens: list[int], num_tokens: int, device: torch.device) -> _MaskLayout:
        """The layout of pairs (prompts[i], tokens[i]), tokens in [0, num_tokens)."""
        rows_of_prompt: dict[int, list[int]] = {}
        rows_of_token: list[list[int]] = [[] for _ in range(num_tokens)]
        for row, (prompt, token) in enumerate(zip(prompts, tokens, strict=True)):
            rows_of_prompt.setdefault(prompt, []).append(row)
            rows_of_token[token].append(row)
        return cls(len(prompts), rows_of_prompt, tuple(cls._tensor(rows, device) for rows in rows_of_token), device)

    @staticmethod
    def _tensor(values: list[int], device: torch.device) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    def groups(self, size: int) -> Iterator[_MaskGroup]:
        """The distinct prompts, in order of first selection, `size` a group."""
        distinct = list(self.rows_of_prompt)
        for start in range(0, len(distinct), size):
            yield self._group(distinct[start : start + size])

    def _group(self, prompts: list[int]) -> _MaskGroup:
        width = max(len(self.rows_of_prompt[p]) for p in prompts)
        rows: list[int] = []
        filled: list[int] = []
        destination = [self.count] * (len(prompts) * width)  # the spare row
        for i, prompt in enumerate(prompts):
            for j, row in enumerate(self.rows_of_prompt[prompt]):
                rows.append(row)
                filled.append(i * width + j)
                destination[i * width + j] = row
        return _MaskGroup(
            prompts,
            width,
            self._tensor(rows, self.device),
            self._tensor(filled, self.device),
            self._tensor(destination, self.device),
        )
