"""Connected components of binary masks, and SAM 2's hole and sprinkle removal, without SAM 2's `_C` extension.

SAM 2 fills small holes in (and removes small specks from) its low-resolution mask logits with a CUDA kernel,
`sam2._C.get_connected_components`. When that extension is not built, `SAM2Transforms.postprocess_masks` warns
and returns the logits untouched, so `min_mask_region_area > 0` silently stops doing anything. This module
gives the same results with OpenCV on the CPU, for CPU and CUDA tensors alike:

- `connected_components(mask)`: (N, 1, H, W) bool or uint8 in, (labels, counts) out, both int32 (N, 1, H, W)
  on the input's device, numbered and counted exactly as the kernel does.
- `fill_holes_and_sprinkles(masks, threshold, max_hole_area, max_sprinkle_area)`: (B, C, h, w) logits in,
  float32 logits of the same shape out, as `postprocess_masks` leaves them before it resizes them.
- `labelling_sam2s_own(label=connected_components)`: a context in which SAM 2's own code labels with `label`;
  its video predictor's hole filling (`fill_hole_area`, 8 as `build_sam2_video_predictor` sets it) then runs
  as with `_C`.

On CUDA, where the largest area asked for is small (DEVICE_AREA), the components of at most that area are
found on the device instead (`small_components`: no copy to the host and back, no wait for the device), by
both functions and by the video predictor's hole filling.

Facts taken from the kernel (facebookresearch/sam2, sam2/csrc/connected_components.cu, commit 2b90b9f):
8-connectivity (its merge step joins diagonal neighbours), background labelled and counted 0, and each
component labelled 1 + the flat index (row * W + col) of the top-left pixel of the first 2x2 block, in raster
order, that holds one of its pixels (unions keep the smaller root, over blocks of 2x2 pixels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sam2 import sam2_video_predictor
from sam2.utils import misc

__all__ = ["connected_components", "fill_holes_and_sprinkles", "labelling_sam2s_own", "small_components"]

# On CUDA, components of at most this many pixels are found on the device: `small_components` takes one
# step a pixel of area, each a few small kernels, against one copy to the host and back and a wait for the
# device. SAM 2's video hole filling asks for 8. (A bound chosen without a GPU measurement.)
DEVICE_AREA = 64
# SAM 2's video hole filling: holes become this mask score (misc.fill_holes_in_mask_scores).
HOLE_SCORE = 0.1


def connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label the 8-connected foreground components of each of N binary masks.

    `mask`: (N, 1, H, W), bool or uint8 (nonzero is foreground), on any device. CUDA input is copied to the
    CPU, labelled there with OpenCV, and the results are copied back to the input's device.

    Returns `(labels, counts)`, both int32 of shape (N, 1, H, W) on the input's device, as
    `sam2._C.get_connected_components` returns them:

    - `labels`: 0 on background; on foreground, 1 + (2 * (r // 2)) * W + 2 * (c // 2) minimised over the
      component's pixels (r, c), i.e. 1 + the flat index of the top-left corner of its first 2x2 block.
      Labels are unique within one mask, not consecutive, and restart for every mask.
    - `counts`: on foreground, the number of pixels in that pixel's component; 0 on background.

    The kernel refuses odd H or W; here any size works, numbered by the same rule.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (N, 1, H, W), got {tuple(mask.shape)}")
    if mask.dtype not in (torch.bool, torch.uint8):
        # A float mask cast to uint8 would drop values in (0, 1): make the caller choose the threshold.
        raise TypeError(f"mask must be bool or uint8, got {mask.dtype}")
    n, _, height, width = mask.shape
    images = mask.detach().to(device="cpu", dtype=torch.uint8).contiguous().numpy()
    labels = np.zeros((n, 1, height, width), dtype=np.int32)
    counts = np.zeros((n, 1, height, width), dtype=np.int32)
    if height > 0 and width > 0:
        blocks_high, blocks_wide = (height + 1) // 2, (width + 1) // 2
        block = np.arange(blocks_high * blocks_wide, dtype=np.int64)
        # What the kernel names a component after: the flat pixel index of each block's top-left corner.
        block_corner = 2 * (block // blocks_wide) * width + 2 * (block % blocks_wide)
        for i in range(n):
            _relabel(images[i, 0], block, block_corner, labels[i, 0], counts[i, 0])
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def _relabel(
    image: np.ndarray, block: np.ndarray, block_corner: np.ndarray, labels_out: np.ndarray, counts_out: np.ndarray
) -> None:
    """Write the kernel's labels and areas for one (H, W) uint8 image into `labels_out` and `counts_out`."""
    n_labels, cv_labels, stats, _ = cv2.connectedComponentsWithStats(image, connectivity=8, ltype=cv2.CV_32S)
    if n_labels == 1:
        return
    height, width = image.shape
    padded = cv_labels
    if height % 2 or width % 2:
        padded = np.pad(cv_labels, ((0, height % 2), (0, width % 2)))
    # The pixels of a 2x2 block are all neighbours of each other, so its foreground pixels share one OpenCV
    # label and the largest of the four is that label (or 0 for an empty block).
    block_labels = np.maximum(
        np.maximum(padded[0::2, 0::2], padded[0::2, 1::2]), np.maximum(padded[1::2, 0::2], padded[1::2, 1::2])
    ).ravel()
    first_block = np.full(n_labels, block.size, dtype=np.int64)
    np.minimum.at(first_block, block_labels, block)
    label_of = np.zeros(n_labels, dtype=np.int32)
    label_of[1:] = block_corner[first_block[1:]] + 1
    area_of = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
    area_of[0] = 0
    labels_out[...] = label_of[cv_labels]
    counts_out[...] = area_of[cv_labels]


def fill_holes_and_sprinkles(
    masks: torch.Tensor, threshold: float, max_hole_area: float, max_sprinkle_area: float
) -> torch.Tensor:
    """Fill small holes in, and remove small specks from, mask logits, as SAM 2's post-processing does.

    `masks`: (B, C, h, w) logits on any device; a pixel is foreground when its logit is > `threshold`.
    Returns float32 logits of the same shape and device, where

    - if `max_hole_area > 0`, every background component (8-connected, logits <= `threshold`) of at most
      `max_hole_area` pixels is set to `threshold + 10.0`;
    - if `max_sprinkle_area > 0`, every foreground component of at most `max_sprinkle_area` pixels is set to
      `threshold - 10.0`.

    This is `SAM2Transforms.postprocess_masks` up to, not including, its resize to the image size, with
    `connected_components` in place of the `_C` kernel; errors are raised, never skipped. When both areas are
    <= 0 the input is returned as it is (converted to float32, which may be the same tensor).
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (B, C, h, w), got {tuple(masks.shape)}")
    masks = masks.float()
    # SAM 2 finds both kinds of component on the logits it was given, not on the hole-filled ones: a speck
    # keeps its own area even when it encloses a hole that is filled.
    original = masks.flatten(0, 1).unsqueeze(1)
    if max_hole_area > 0:
        is_hole = _small(original <= threshold, max_hole_area).reshape_as(masks)
        masks = torch.where(is_hole, threshold + 10.0, masks)
    if max_sprinkle_area > 0:
        is_sprinkle = _small(original > threshold, max_sprinkle_area).reshape_as(masks)
        masks = torch.where(is_sprinkle, threshold - 10.0, masks)
    return masks


def small_components(mask: torch.Tensor, max_area: int) -> torch.Tensor:
    """Which pixels of N binary masks lie in 8-connected foreground components of at most `max_area` pixels.

    `mask`: (N, 1, H, W) bool on any device; returns a bool tensor of its shape, computed there. Each
    foreground pixel takes the smallest flat index within `max_area` - 1 steps through the foreground, which
    a component of at most `max_area` pixels shares whole. A set of pixels sharing an index is a whole
    component exactly when no neighbour across its edge holds another index: those of at most `max_area`
    pixels are the answer, the others are parts of larger components.
    """
    n, _, height, width = mask.shape
    if n == 0 or height * width == 0 or max_area < 1:
        return torch.zeros_like(mask)
    # float32 holds every flat index up to 2**24 exactly (SAM 2's low-res masks: 65,536).
    if height * width >= 2**24:
        raise ValueError(f"masks of {height} x {width} pixels are too large to label on the device")
    far = float(height * width)
    index = torch.arange(height * width, device=mask.device, dtype=torch.float32).view(1, 1, height, width)
    labels = torch.where(mask, index, far)
    for _ in range(max_area - 1):
        labels = torch.where(mask, -F.max_pool2d(-labels, 3, stride=1, padding=1), far)
    lowest = -F.max_pool2d(-labels, 3, stride=1, padding=1)
    highest = F.max_pool2d(torch.where(mask, labels, -1.0), 3, stride=1, padding=1)
    open_edge = mask & ((lowest != labels) | (highest != labels))
    # One bin per (mask, index): its pixels, and whether any lies on an open edge (no boolean indexing,
    # which would wait for the device).
    bins = (labels.long() + torch.arange(n, device=mask.device).view(n, 1, 1, 1) * (height * width + 1)).flatten()
    foreground = mask.flatten()
    empty = torch.zeros(n * (height * width + 1), dtype=torch.int32, device=mask.device)
    areas = empty.index_add(0, bins, foreground.int())
    opened = empty.index_add(0, bins, open_edge.flatten().int())
    return (foreground & (areas[bins] <= max_area) & (opened[bins] == 0)).view_as(mask)


def _on_device(mask: torch.Tensor, max_area: float) -> bool:
    """Whether the components of at most `max_area` pixels of `mask` are found on its device: on CUDA, for
    areas up to DEVICE_AREA."""
    return mask.device.type == "cuda" and max_area <= DEVICE_AREA


def _small(mask: torch.Tensor, max_area: float) -> torch.Tensor:
    """(N, 1, H, W) bool -> its pixels in foreground components of at most `max_area` pixels: by
    `small_components` where `_on_device`, else by `connected_components`."""
    if _on_device(mask, max_area):
        return small_components(mask, int(max_area))
    labels, areas = connected_components(mask)
    return (labels > 0) & (areas <= max_area)


@contextlib.contextmanager
def labelling_sam2s_own(
    label: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = connected_components,
) -> Iterator[None]:
    """While in it, `sam2.utils.misc.get_connected_components` (the `_C` kernel's caller, looked up when
    SAM 2's post-processing runs) is `label` (the kernel's answer: labels and areas), and the video
    predictor fills small holes on the device where `_on_device` (with HOLE_SCORE, as
    misc.fill_holes_in_mask_scores does). Scoped, not for good: SAM 2's code outside a request (a
    reference in the same process) keeps its own behaviour."""
    original_label = misc.get_connected_components
    original_fill = sam2_video_predictor.fill_holes_in_mask_scores

    def fill(mask: torch.Tensor, max_area: int) -> torch.Tensor:
        if not _on_device(mask, max_area):
            return original_fill(mask, max_area)
        return torch.where(small_components(mask <= 0, max_area), HOLE_SCORE, mask)

    misc.get_connected_components = label
    sam2_video_predictor.fill_holes_in_mask_scores = fill
    try:
        yield
    finally:
        misc.get_connected_components = original_label
        sam2_video_predictor.fill_holes_in_mask_scores = original_fill
