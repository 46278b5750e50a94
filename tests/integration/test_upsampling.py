"""`upsampling.postprocess_masks` against `Sam.postprocess_masks`: the same logits (float32
rounding apart) for crops and resizes of every kind, and the model's own result where the
matrix products would not pay."""

from __future__ import annotations

import pytest
import torch
from segment_anything import build_sam_vit_b
from segment_anything.modeling import Sam

from sam_fast_serve.models.rle import encode_masks
from sam_fast_serve.models.sam1.upsampling import postprocess_masks
from sam_fast_serve.models.upsampling import products_pay


@pytest.fixture(scope="module")
def sam() -> Sam:
    return build_sam_vit_b(checkpoint=None).eval()


@pytest.mark.parametrize(
    ("input_size", "original_size"),
    [
        ((1024, 1024), (512, 512)),  # square, shrunk 2x
        ((1024, 683), (480, 320)),  # portrait: padding cropped on the right
        ((576, 1024), (360, 640)),  # landscape: padding cropped at the bottom
        ((1024, 1024), (301, 301)),  # an odd size
        ((1024, 768), (200, 150)),  # much smaller than the low-res masks' 256
    ],
)
def test_products_equal_the_models_interpolations(
    sam: Sam, input_size: tuple[int, int], original_size: tuple[int, int]
) -> None:
    assert products_pay((256, 256), original_size, sam.image_encoder.img_size**2 + original_size[0] * original_size[1])
    logits = torch.randn(3, 2, 256, 256, generator=torch.Generator().manual_seed(0)) * 8
    with torch.inference_mode():
        expected = sam.postprocess_masks(logits, input_size, original_size)
        got = postprocess_masks(sam, logits, input_size, original_size)
    assert got.shape == expected.shape == (3, 2, *original_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # A pixel changes side only where the logit is within rounding of the threshold.
    flipped = (got > 0) != (expected > 0)
    assert (expected[flipped].abs() < 1e-5).all()


def test_products_leave_masks_in_the_rle_encoders_order(sam: Sam) -> None:
    """Each mask comes out column-major (pycocotools reads masks so), which the thresholded masks
    keep; their RLEs are those of the same masks stored row-major."""
    logits = torch.randn(4, 1, 256, 256, generator=torch.Generator().manual_seed(2)) * 8
    with torch.inference_mode():
        got = postprocess_masks(sam, logits, (1024, 1024), (512, 384))
    masks = got[:, 0] > 0
    assert masks.transpose(1, 2).is_contiguous()
    assert masks.any() and not masks.all()
    assert encode_masks(masks) == encode_masks(masks.contiguous())


def test_large_images_keep_the_models_interpolations(sam: Sam) -> None:
    """Above about a megapixel the products cost more than interpolating: the model's own
    function runs, so the result is identical."""
    input_size, original_size = (768, 1024), (1536, 2048)
    assert not products_pay(
        (256, 256), original_size, sam.image_encoder.img_size**2 + original_size[0] * original_size[1]
    )
    logits = torch.randn(2, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = sam.postprocess_masks(logits, input_size, original_size)
        got = postprocess_masks(sam, logits, input_size, original_size)
    assert torch.equal(got, expected)
