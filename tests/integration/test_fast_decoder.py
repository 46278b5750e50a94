"""Equivalence of `FastMaskDecoder` with segment_anything's `MaskDecoder.predict_masks`.

A random-weight vit_b SAM (the decoder and prompt encoder are the same for every
variant) decodes random image embeddings with real prompt-encoder outputs. The unit
tests check each rewrite (per-image sharing, folded cross-attention) against the
reference `Attention` modules; the end-to-end tests check IoU predictions and mask
logits for points, mixed points, boxes and box + points, in float32 and bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from segment_anything import build_sam_vit_b
from segment_anything.modeling import Sam
from torch import Tensor

from sam_fast_serve.models.fast_decoder import (
    FastMaskDecoder,
    _head_outputs,
    _image_to_token_attention,
    _token_to_image_first,
    _token_to_image_folded,
)

IMAGE_SIZE = 1024
REFERENCE_CHUNK = 16  # prompts per reference call: same result, less time and memory
KINDS = ["points", "mixed_points", "boxes", "box_and_points"]


@dataclass(frozen=True)
class Prompts:
    sparse: Tensor  # (B, N, C)
    dense: Tensor  # (1, C, H, W)


@dataclass(frozen=True)
class Reference:
    masks: Tensor  # (B, 4, 256, 256) low-res logits
    iou: Tensor  # (B, 4)


@pytest.fixture(scope="module")
def sam() -> Sam:
    torch.manual_seed(0)
    return build_sam_vit_b(checkpoint=None).eval()


@pytest.fixture(scope="module")
def image(sam: Sam) -> tuple[Tensor, Tensor]:
    """(image embeddings, image positional encoding), each (1, 256, 64, 64)."""
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        return torch.randn(1, 256, 64, 64, generator=generator), sam.prompt_encoder.get_dense_pe()


def _random_boxes(n: int, generator: torch.Generator) -> Tensor:
    corners = torch.rand(n, 2, 2, generator=generator) * IMAGE_SIZE
    return torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)  # (x0, y0, x1, y1)


def _encode(sam: Sam, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None) -> Prompts:
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    return Prompts(sparse=sparse, dense=dense[:1])


def _make_prompts(sam: Sam, kind: str) -> Prompts:
    g = torch.Generator().manual_seed(10 + KINDS.index(kind))
    if kind == "points":  # automatic mask generation: one positive point per prompt
        coords = torch.rand(64, 1, 2, generator=g) * IMAGE_SIZE
        return _encode(sam, (coords, torch.ones(64, 1, dtype=torch.long)), None)
    if kind == "mixed_points":
        coords = torch.rand(16, 3, 2, generator=g) * IMAGE_SIZE
        return _encode(sam, (coords, torch.randint(0, 2, (16, 3), generator=g)), None)
    if kind == "boxes":
        return _encode(sam, None, _random_boxes(16, g))
    if kind == "box_and_points":
        coords = torch.rand(16, 2, 2, generator=g) * IMAGE_SIZE
        points = (coords, torch.randint(0, 2, (16, 2), generator=g))
        return _encode(sam, points, _random_boxes(16, g))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def cases(sam: Sam, image: tuple[Tensor, Tensor]) -> dict[str, tuple[Prompts, Reference]]:
    """Prompts of every kind with the reference decoder's float32 outputs."""
    embeddings, pe = image
    out = {}
    for kind in KINDS:
        prompts = _make_prompts(sam, kind)
        masks, iou = [], []
        with torch.inference_mode():
            for sparse in prompts.sparse.split(REFERENCE_CHUNK):
                m, i = sam.mask_decoder.predict_masks(embeddings, pe, sparse, prompts.dense)
                masks.append(m)
                iou.append(i)
        out[kind] = (prompts, Reference(masks=torch.cat(masks), iou=torch.cat(iou)))
    return out


def _decode_all(fast: FastMaskDecoder, image: tuple[Tensor, Tensor], prompts: Prompts) -> tuple[Tensor, Tensor]:
    """(iou_pred (B, 4), mask logits (B, 4, 256, 256)) from the fast decoder."""
    state = fast.prepare_image(image[0], image[1], prompts.dense)
    tokens = fast.run_transformer(state, prompts.sparse)
    b, m = tokens.iou_pred.shape
    prompt_idx = torch.arange(b).repeat_interleave(m)
    mask_idx = torch.arange(m).repeat(b)
    masks = fast.mask_logits(tokens, prompt_idx, mask_idx)
    return tokens.iou_pred, masks.view(b, m, *masks.shape[-2:])


def _mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Per-mask IoU of boolean masks (..., H, W); 1 where both are empty."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# --- Unit tests: each rewrite against the reference Attention module ------------------


def _random_tokens(b: int, t: int, generator: torch.Generator) -> Tensor:
    return torch.randn(b, t, 256, generator=generator)


def test_first_block_shares_image_projections(sam: Sam, image: tuple[Tensor, Tensor]) -> None:
    """Idea 1: the first block's cross attentions with per-image projections."""
    fast = FastMaskDecoder(sam.mask_decoder)
    embeddings, pe = image
    dense = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    state = fast.prepare_image(embeddings, pe, dense)
    block = sam.mask_decoder.transformer.layers[0]
    g = torch.Generator().manual_seed(3)
    queries, query_pe = _random_tokens(5, 7, g), _random_tokens(5, 7, g)
    src = (embeddings + dense).flatten(2).transpose(1, 2).expand(5, -1, -1)
    src_pe = src + pe.flatten(2).transpose(1, 2)
    with torch.inference_mode():
        ref = block.cross_attn_token_to_image(q=queries + query_pe, k=src_pe, v=src)
        out = _token_to_image_first(
            fast._token_to_image[0], queries + query_pe, state.image_keys[0], state.first_values
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)

        ref = src + block.cross_attn_image_to_token(q=src_pe, k=queries + query_pe, v=queries)
        w = fast._image_to_token[0]
        attn = _image_to_token_attention(w, queries + query_pe, state.image_queries[0], keys=None)
        out = torch.baddbmm(state.src, attn.transpose(1, 2), _head_outputs(w, queries))
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_folded_cross_attention(sam: Sam, image: tuple[Tensor, Tensor]) -> None:
    """Idea 2: cross attentions with per-prompt image tokens, never projecting them."""
    fast = FastMaskDecoder(sam.mask_decoder)
    embeddings, pe = image
    state = fast.prepare_image(embeddings, pe, torch.zeros_like(embeddings))
    block = sam.mask_decoder.transformer.layers[1]
    g = torch.Generator().manual_seed(4)
    queries, query_pe = _random_tokens(3, 9, g), _random_tokens(3, 9, g)
    keys = torch.randn(3, 64 * 64, 256, generator=g)
    keys_pe = keys + pe.flatten(2).transpose(1, 2)
    with torch.inference_mode():
        ref = block.cross_attn_token_to_image(q=queries + query_pe, k=keys_pe, v=keys)
        out = _token_to_image_folded(fast._token_to_image[1], queries + query_pe, keys, state.image_keys[1])
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)

        final = sam.mask_decoder.transformer.final_attn_token_to_image
        ref = final(q=queries + query_pe, k=keys_pe, v=keys)
        out = _token_to_image_folded(fast._final_attn, queries + query_pe, keys, state.image_keys[2])
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)

        ref = keys + block.cross_attn_image_to_token(q=keys_pe, k=queries + query_pe, v=queries)
        w = fast._image_to_token[1]
        attn = _image_to_token_attention(w, queries + query_pe, state.image_queries[1], keys)
        out = keys.clone().baddbmm_(attn.transpose(1, 2), _head_outputs(w, queries))
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# --- End to end --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_float32_matches_reference(
    sam: Sam, image: tuple[Tensor, Tensor], cases: dict[str, tuple[Prompts, Reference]], kind: str
) -> None:
    prompts, ref = cases[kind]
    iou, masks = _decode_all(FastMaskDecoder(sam.mask_decoder), image, prompts)

    assert iou.dtype == torch.float32 and iou.shape == ref.iou.shape
    assert masks.dtype == torch.float32 and masks.shape == ref.masks.shape
    assert (iou - ref.iou).abs().max().item() < 1e-4
    scale = ref.masks.abs().max().item()
    assert (masks - ref.masks).abs().max().item() < 1e-3 * scale
    agreement = ((masks > 0) == (ref.masks > 0)).float().mean().item()
    assert agreement > 0.999


BF16_PROMPTS = 16


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_close_to_float32_reference(
    sam: Sam, image: tuple[Tensor, Tensor], cases: dict[str, tuple[Prompts, Reference]], kind: str
) -> None:
    # The first prompts of each kind only: bf16 is emulated, hence slow, on CPUs without it.
    prompts, ref = cases[kind]
    prompts = Prompts(sparse=prompts.sparse[:BF16_PROMPTS], dense=prompts.dense)
    ref = Reference(masks=ref.masks[:BF16_PROMPTS], iou=ref.iou[:BF16_PROMPTS])
    iou, masks = _decode_all(FastMaskDecoder(sam.mask_decoder, torch.bfloat16), image, prompts)

    assert iou.dtype == torch.float32 and masks.dtype == torch.float32
    assert (iou - ref.iou).abs().max().item() < 2e-2
    mask_iou = _mask_iou(masks > 0, ref.masks > 0)
    assert (mask_iou >= 0.9).float().mean().item() >= 0.97


def test_mask_logits_subset_equals_full(sam: Sam, image: tuple[Tensor, Tensor], cases) -> None:
    """Idea 3: masks for selected (prompt, mask token) pairs, in any order, with repeats."""
    prompts, _ = cases["mixed_points"]
    fast = FastMaskDecoder(sam.mask_decoder)
    _, full = _decode_all(fast, image, prompts)
    tokens = fast.run_transformer(fast.prepare_image(image[0], image[1], prompts.dense), prompts.sparse)

    prompt_idx = torch.tensor([7, 2, 7, 11, 0, 2])
    mask_idx = torch.tensor([3, 0, 1, 1, 2, 0])
    subset = fast.mask_logits(tokens, prompt_idx, mask_idx)
    torch.testing.assert_close(subset, full[prompt_idx, mask_idx], atol=1e-6, rtol=1e-6)

    empty = fast.mask_logits(tokens, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert empty.shape == (0, 256, 256)


def test_chunking_does_not_change_results(sam: Sam, image: tuple[Tensor, Tensor], cases) -> None:
    """Uneven prompt chunks (3 + 3 + 3 + 3 + 3 + 1) give the same tokens as even ones (4 x 4)."""
    prompts, _ = cases["boxes"]
    even = FastMaskDecoder(sam.mask_decoder, prompts_per_chunk=4)
    uneven = FastMaskDecoder(sam.mask_decoder, prompts_per_chunk=3)
    state = even.prepare_image(image[0], image[1], prompts.dense)
    a, b = even.run_transformer(state, prompts.sparse), uneven.run_transformer(state, prompts.sparse)
    torch.testing.assert_close(b.iou_pred, a.iou_pred, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.mask_tokens, a.mask_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(b.src), torch.stack(a.src), atol=1e-5, rtol=1e-5)


def test_rejects_per_prompt_dense_embeddings(sam: Sam, image: tuple[Tensor, Tensor]) -> None:
    fast = FastMaskDecoder(sam.mask_decoder)
    with pytest.raises(ValueError, match="dense_embeddings"):
        fast.prepare_image(image[0], image[1], torch.zeros(2, 256, 64, 64))
