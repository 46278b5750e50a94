"""Bilinear resizing of mask logits as two matrix products, for the CPU.

Resizing with `F.interpolate` (bilinear, align_corners=False) is linear and acts on rows and
columns separately, so resizing a (h, w) mask to (H, W), or a chain of such resizes and crops
along each axis, is `R_y @ mask @ R_x^T` with fixed (H, h) and (W, w) matrices: two GEMMs for a
batch of masks. The matrices are built by running float32 interpolation on the identity, so each
weight is the one the model's own float32 interpolation computes (in float64 the source positions,
hence weights, differ by ~1e-4); the products equal the interpolations up to float32 rounding
(about 1e-6 of the logits' scale).

The second product is computed transposed, so each mask's columns lie contiguous in memory (the
result is a transposed view): that is the order pycocotools' RLE encoder reads, and the thresholded
masks inherit it, so encoding them needs no transposing copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# What one pixel of F.interpolate costs, in GEMM FLOPs, measured on 2 AMX Xeon cores in float32
# (0.58 ns a pixel against 2.4-2.5 ps a FLOP: 230-240), rounded down so that the products are
# chosen only where they clearly pay.
PRODUCT_FLOPS_PER_PIXEL = 200


@lru_cache(maxsize=32)
def axis_weights(steps: tuple[tuple[int, int], ...]) -> Tensor:
    """The (out, in) float32 matrix of a chain of resizes along one axis: each step (size, kept)
    resizes to `size` (linear, align_corners=False) and keeps its first `kept` entries."""
    size = steps[0][0]
    x = torch.eye(size)[None]  # one channel per input pixel
    for resize_to, kept in steps[1:]:
        x = F.interpolate(x, size=resize_to, mode="linear", align_corners=False)[..., :kept]
    return x[0].t().contiguous()


def products_pay(low_res: Sequence[int], original: Sequence[int], interpolated_pixels: int) -> bool:
    """Whether the two products cost less than interpolations that write `interpolated_pixels`."""
    (h, w), (big_h, big_w) = low_res, original
    flops = 2 * h * big_w * (w + big_h)  # mask @ R_x^T, then R_y @ that
    return flops < PRODUCT_FLOPS_PER_PIXEL * interpolated_pixels


def resize_products_pay(low_res: Sequence[int], original: Sequence[int]) -> bool:
    """Whether the products pay against one interpolation straight to `original`."""
    return products_pay(low_res, original, int(original[0]) * int(original[1]))


def by_products(masks: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """(..., h, w) -> (..., H, W) float32: rows @ mask @ columns^T, column-major per mask."""
    resized_columns = torch.matmul(masks.float(), columns.t())  # (..., h, W)
    return torch.matmul(resized_columns.transpose(-1, -2), rows.t()).transpose(-1, -2)


def bilinear(masks: Tensor, size: Sequence[int]) -> Tensor:
    """(..., h, w) float32 masks resized to (..., H, W) `size` (bilinear, align_corners=False): by
    the two products on the CPU where they pay, else F.interpolate (on a GPU, always)."""
    if masks.device.type == "cpu" and resize_products_pay(masks.shape[-2:], size):
        return resized(masks, size)
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    return F.interpolate(flat, tuple(int(s) for s in size), mode="bilinear", align_corners=False).view(
        *masks.shape[:-2], int(size[0]), int(size[1])
    )


def resized(masks: Tensor, size: Sequence[int]) -> Tensor:
    """`F.interpolate(masks, size, mode="bilinear", align_corners=False)` by the two products."""
    h, w = masks.shape[-2:]
    rows = axis_weights(((h, h), (int(size[0]), int(size[0]))))
    columns = axis_weights(((w, w), (int(size[1]), int(size[1]))))
    return by_products(masks, rows, columns)
