"""`accelerate_image_encoder` computes segment_anything's ImageEncoderViT function.

Most tests use a small encoder (384 channels, 12 heads of 32) with 4 blocks, two of them
global, on a 20 x 20 token grid: 14 x 14 windows then need padding to 28 x 28. So all paths are
covered: windowed with padding (relative position bias folded into the matmul, 14 + 14 <= 32)
and global (bias added to the scores, 20 + 20 > 32). The relative position tables are random
(segment_anything initialises them to zero, which would hide errors there).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from segment_anything import build_sam_vit_b
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor

from sam_fast_serve.models.sam1 import fast_encoder
from sam_fast_serve.models.sam1.fast_encoder import FastBlock, accelerate_image_encoder

IMAGE_SIZE = 320


def randomize_rel_pos(encoder: ImageEncoderViT) -> ImageEncoderViT:
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0.0, 0.5)
            block.attn.rel_pos_w.normal_(0.0, 0.5)
    return encoder


def small_encoder(use_rel_pos: bool = True) -> ImageEncoderViT:
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=IMAGE_SIZE,
        depth=4,
        embed_dim=384,
        num_heads=12,
        use_rel_pos=use_rel_pos,
        window_size=14,
        global_attn_indexes=(1, 3),
        out_chans=256,
    )
    return randomize_rel_pos(encoder.eval()) if use_rel_pos else encoder.eval()


@pytest.fixture(scope="module")
def encoders() -> tuple[ImageEncoderViT, ImageEncoderViT]:
    """(reference, accelerated copy), both fp32."""
    reference = small_encoder()
    return reference, accelerate_image_encoder(copy.deepcopy(reference))


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def relative_error(value: Tensor, reference: Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def assert_fp32_equal(value: Tensor, reference: Tensor) -> None:
    assert value.shape == reference.shape
    scale = reference.abs().max().item()
    assert (value - reference).abs().max().item() <= 1e-4 * scale


@pytest.fixture
def chunk_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(fast_encoder, "_SCORE_CHUNK_BYTES", request.param)
    yield request.param


# fp32 score budgets: the default (whole attention at once at this size); 7 query rows of the
# 400-token global attention (57 chunks per head, the last one short); 5 of the 48
# (window, head) rows of an image's windowed attention (the last chunk short).
@pytest.mark.parametrize(
    "chunk_bytes",
    [fast_encoder._SCORE_CHUNK_BYTES, 7 * 400 * 4, 5 * 196 * 196 * 4],
    indirect=True,
    ids=["default", "query-chunks", "batch-chunks"],
)
@torch.no_grad()
def test_fp32_equals_reference(encoders, images: Tensor, chunk_bytes: int) -> None:
    reference, fast = encoders
    assert_fp32_equal(fast(images), reference(images))


@torch.no_grad()
def test_without_relative_positions_equals_reference(images: Tensor) -> None:
    reference = small_encoder(use_rel_pos=False)
    fast = accelerate_image_encoder(copy.deepcopy(reference))
    assert_fp32_equal(fast(images), reference(images))


@torch.no_grad()
def test_sdpa_attention_equals_reference(encoders, images: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention used off CPU (one SDPA call with the bias as a mask), run here on CPU."""
    reference, fast = encoders
    monkeypatch.setattr(fast_encoder, "_attend_chunked", fast_encoder._attend_sdpa)
    assert_fp32_equal(fast(images), reference(images))


@torch.no_grad()
def test_folded_attention_equals_reference(encoders, images: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention used in bf16 on CPU (one fused call, the bias folded into q and k), in fp32."""
    reference, fast = encoders
    monkeypatch.setattr(fast_encoder, "_attend_chunked", fast_encoder._attend_folded)
    assert_fp32_equal(fast(images), reference(images))


def test_with_gradients_equals_reference_and_backpropagates(encoders, images: Tensor) -> None:
    """With autograd on, the blocks use F.linear (oneDNN's linear has no backward)."""
    reference, fast = encoders
    with torch.no_grad():
        expected = reference(images[:1])
    out = fast(images[:1])
    assert_fp32_equal(out.detach(), expected)
    out.square().mean().backward()
    grad = fast.blocks[1].attn.rel_pos_h.grad
    assert grad is not None and grad.abs().sum() > 0
    fast.zero_grad(set_to_none=True)


@torch.no_grad()
def test_bf16_as_close_to_fp32_as_the_reference_bf16(encoders, images: Tensor) -> None:
    reference, _ = encoders
    expected = reference(images)
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    fast_bf16 = accelerate_image_encoder(copy.deepcopy(reference).to(torch.bfloat16))
    reference_error = relative_error(reference_bf16(images.bfloat16()), expected)
    out = fast_bf16(images.bfloat16())
    assert out.dtype == torch.bfloat16
    fast_error = relative_error(out, expected)
    cosine = F.cosine_similarity(out.float().flatten(), expected.flatten(), dim=0).item()
    print(
        f"relative error vs fp32: reference bf16 {reference_error:.4f}, fast bf16 {fast_error:.4f}; "
        f"fast bf16 cosine {cosine:.6f}"
    )
    assert fast_error <= 1.25 * reference_error
    assert cosine > 0.999


def test_keeps_parameters_and_state_dict_and_is_idempotent() -> None:
    encoder = small_encoder()
    keys = list(encoder.state_dict())
    parameters = [p.data_ptr() for p in encoder.parameters()]
    assert accelerate_image_encoder(encoder) is encoder
    first = list(encoder.blocks)
    accelerate_image_encoder(encoder)
    assert all(isinstance(block, FastBlock) for block in encoder.blocks)
    assert list(encoder.blocks) == first
    assert list(encoder.state_dict()) == keys
    assert [p.data_ptr() for p in encoder.parameters()] == parameters
    encoder.to(torch.bfloat16)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


def test_rejects_what_is_not_a_block() -> None:
    with pytest.raises(TypeError):
        FastBlock(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_full_size_vit_b_fp32_equals_reference() -> None:
    """vit_b at 1024 x 1024: 64 x 64 tokens, several query chunks per head in global attention."""
    torch.manual_seed(0)
    reference = randomize_rel_pos(build_sam_vit_b(None).image_encoder.eval())
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    expected = reference(image)
    assert_fp32_equal(accelerate_image_encoder(reference)(image), expected)
