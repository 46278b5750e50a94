"""`Sam.postprocess_masks` as two matrix products, for the CPU.

`postprocess_masks` resizes each (h, w) low-resolution mask to the padded model input
(bilinear), crops the padding, and resizes what is left to the original image (bilinear).
Each step is linear and acts on rows and columns separately, so the whole is
`R_y @ mask @ R_x^T` with fixed (H, h) and (W, w) matrices: two GEMMs for a batch of
masks, without the padded-size (1024 x 1024) intermediate. Equal to `postprocess_masks`
up to float32 rounding (about 1e-6 of the logits' scale), and cheaper on the CPU unless the
original image is large (see `_PRODUCT_FLOPS_PER_PIXEL`).

The second product is computed transposed, so each mask's columns lie contiguous in memory
(the result is a transposed view): that is the order pycocotools' RLE encoder reads, and the
thresholded masks inherit it, so encoding them needs no transposing copy (0.96 -> 0.82 ms a
512 x 512 mask for stability, thresholding, box and RLE; the products cost the same).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor

# What one pixel of F.interpolate costs, in GEMM FLOPs, measured on 2 AMX Xeon cores in float32
# (0.58 ns a pixel against 2.4-2.5 ps a FLOP: 230-240), rounded down so that the products are
# chosen only where they clearly pay: a 512 x 512 photo, 0.77 -> 0.49 ms a mask; 480 x 320,
# 0.74 -> 0.33 ms; a 2048 x 1536 one stays with interpolation (2.4 ms against 4.7 ms).
_PRODUCT_FLOPS_PER_PIXEL = 200


@lru_cache(maxsize=16)
def axis_weights(low_res: int, padded: int, kept: int, original: int) -> Tensor:
    """The (original, low_res) float32 matrix of `postprocess_masks` along one axis: resize
    low_res -> padded, keep the first `kept` of them, resize kept -> original (each linear,
    align_corners=False, as `F.interpolate` in bilinear mode does along that axis). Built by
    interpolating the identity in float32, so that every weight is the one the model's float32
    interpolation computes (in float64 the source positions, hence weights, differ by ~1e-4)."""
    basis = torch.eye(low_res)[None]  # one channel per low-res pixel
    x = F.interpolate(basis, size=padded, mode="linear", align_corners=False)[..., :kept]
    x = F.interpolate(x, size=original, mode="linear", align_corners=False)
    return x[0].t().contiguous()


def products_pay(low_res: tuple[int, int], padded: int, original: tuple[int, int]) -> bool:
    """Whether the two products cost less than `postprocess_masks`' two interpolations."""
    (h, w), (big_h, big_w) = low_res, original
    flops = 2 * h * big_w * (w + big_h)  # mask @ R_x^T, then R_y @ that
    return flops < _PRODUCT_FLOPS_PER_PIXEL * (padded * padded + big_h * big_w)


def postprocess_masks(model: Sam, masks: Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]) -> Tensor:
    """`model.postprocess_masks(masks, input_size, original_size)`: (B, C, h, w) float logits ->
    (B, C, H, W) float32, by the two products on the CPU where they pay (then column-major per
    mask, see above), else by the model."""
    h, w = masks.shape[-2:]
    padded = model.image_encoder.img_size
    big_h, big_w = int(original_size[0]), int(original_size[1])
    if masks.device.type != "cpu" or not products_pay((h, w), padded, (big_h, big_w)):
        return model.postprocess_masks(masks, input_size, original_size)
    rows = axis_weights(h, padded, int(input_size[0]), big_h)
    columns = axis_weights(w, padded, int(input_size[1]), big_w)
    resized_columns = torch.matmul(masks.float(), columns.t())  # (B, C, h, W)
    return torch.matmul(resized_columns.transpose(-1, -2), rows.t()).transpose(-1, -2)
