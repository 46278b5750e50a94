"""What the automatic mask generators of every family share, after the decoder: the steps from
upsampled logits to compressed RLE (stability, threshold, boxes, crop edge), the small-region
cleanup around them, and the records.

Between stages masks are COCO's compressed RLE (counts as bytes) made by pycocotools' C encoder,
not Python lists of run lengths, which the references deep-copy on every concatenation and encode
in a Python loop (for fragmented masks that took longer than the model). segment_anything's and
sam2's amg helpers are the same functions (stability, boxes, crop edge, uncrop, small regions);
segment_anything's are used for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    uncrop_masks,
)

from sam_fast_serve.common.records import amg_record, rle_to_builtins
from sam_fast_serve.models.budget import items_that_fit
from sam_fast_serve.models.embedding import EmbeddingKeeper
from sam_fast_serve.models.rle import reserve, rle_areas, start_rles

# Low-resolution logits are computed for at most this many masks at a time (256 KiB each).
MASKS_PER_DECODE = 256
# On the CPU, upsampling, stability, boxes and RLE run on a few masks at a time, so that each
# full-size float intermediate stays below glibc's largest mmap threshold (32 MiB) and its memory is
# reused instead of page-faulted in afresh: this halved SAM 1's upsampling time (3072 masks of a
# 512 x 512 photo: 6.3 s in chunks of 256, 2.9 s in chunks of 4).
UPSAMPLE_CPU_BYTES = 16 * 2**20


def upsample_chunk(device: torch.device, largest_pixels: int) -> int:
    """How many masks to upsample and encode at once, when the largest float intermediate of one
    mask has `largest_pixels` pixels: as many as models.budget fits."""
    return items_that_fit(largest_pixels * 4, device, UPSAMPLE_CPU_BYTES)


class BatchedGeneration:
    """What both families' generators add to their reference: the embeddings of a group of images
    (and of their crops) computed `process_batch_size` per encoder call and pinned in the predictor
    for `generate`. A generator sets `predictor`, `process_batch_size`, `crop_n_layers` and
    `crop_overlap_ratio` and defines `generate`."""

    predictor: EmbeddingKeeper
    process_batch_size: int
    crop_n_layers: int
    crop_overlap_ratio: float
    stability_score_offset: float
    stability_score_thresh: float

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        raise NotImplementedError

    @contextmanager
    def pinned(self, images: Sequence[np.ndarray]) -> Iterator[None]:
        """Within: the embeddings of `images` and of their crops are computed and pinned."""
        crops: list[np.ndarray] = []
        for image in images:
            boxes, _ = generate_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            crops.extend(image[y0:y1, x0:x1, :] for x0, y0, x1, y1 in boxes)
        with torch.no_grad():
            self.predictor.pin(crops, self.process_batch_size)
        try:
            yield
        finally:
            self.predictor.unpin()

    def generate_batch(self, images: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
        """`generate` for several RGB uint8 images, their crops encoded `process_batch_size` at a time."""
        with self.pinned(images):
            return [self.generate(image) for image in images]

    def decode_kept(
        self,
        keep: torch.Tensor,
        low_res_of: Callable[[torch.Tensor], torch.Tensor],
        upsample: Callable[[torch.Tensor], torch.Tensor],
        per_upsample: int,
        iou_preds: torch.Tensor,
        points: torch.Tensor,
        crop_box: list[int],
        orig_size: tuple[int, ...],
        mask_threshold: float,
    ) -> MaskData:
        """The (point, mask) pairs `keep` (indices into `iou_preds` and `points`, a row per pair) of
        the crop `crop_box` of an image of `orig_size` as RLE mask data: their low-res logits
        MASKS_PER_DECODE at a time (`low_res_of(pairs)`: (K, h, w)), upsampled (`upsample`: (k, 1,
        h, w) -> (k, 1, H, W), the original size) and encoded by masks_to_host `per_upsample`
        (upsample_chunk) at a time."""
        data = MaskData()
        encoded: Callable[[], MaskData] | None = None
        for chunk in keep.split(MASKS_PER_DECODE):
            logits = low_res_of(chunk)
            # The chunk's rows where the points are, once a chunk: a copy to the host waits for the device.
            point_rows = chunk.to(points.device)
            for rows in torch.arange(len(chunk)).split(per_upsample):
                part = MaskData(
                    masks=upsample(logits[rows][:, None])[:, 0],
                    iou_preds=iou_preds[chunk[rows]],
                    points=points[point_rows[rows]],
                )
                # On CUDA the host encodes the last part while the device upsamples this one.
                if encoded is not None:
                    data.cat(encoded())
                encoded = masks_to_host(
                    part, crop_box, orig_size, mask_threshold, self.stability_score_offset, self.stability_score_thresh
                )
        if encoded is not None:
            data.cat(encoded())
        return data

    def _process_crop(self, *args: Any, **kwargs: Any) -> MaskData:
        # The references make a crop without masks a (0,) crop_boxes tensor, on which the crop NMS
        # (crop_n_layers > 0) fails: give it its (0, 4) shape.
        data = super()._process_crop(*args, **kwargs)  # type: ignore[misc]
        if len(data["rles"]) == 0:
            data["crop_boxes"] = torch.zeros((0, 4), dtype=torch.int64)
        return data


def masks_to_host(
    data: MaskData,
    crop_box: list[int],
    orig_size: tuple[int, ...],
    threshold: float,
    stability_offset: float,
    stability_thresh: float,
) -> Callable[[], MaskData]:
    """Upsampled logits in data["masks"] -> stability filter, thresholding, boxes and crop-edge
    filter, as the references do, on the masks' device; then the masks' RLEs are started
    (rle.start_rles). Returns the call that gives `data` with them (data["rles"]), its masks dropped."""
    orig_h, orig_w = orig_size
    data["stability_score"] = calculate_stability_score(data["masks"], threshold, stability_offset)
    if stability_thresh > 0.0:
        data.filter(data["stability_score"] >= stability_thresh)
    data["masks"] = data["masks"] > threshold
    data["boxes"] = batched_mask_to_box(data["masks"])
    keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
    if not torch.all(keep):
        data.filter(keep)
    rles = start_rles(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
    del data["masks"]

    def encoded() -> MaskData:
        data["rles"] = rles()
        return data

    return encoded


def kept_pairs(iou_preds: torch.Tensor, pred_iou_thresh: float) -> torch.Tensor:
    """Indices of the (point, mask) pairs whose predicted IoU passes `pred_iou_thresh` (all when it
    is 0). The references drop the others after upsampling; dropping them first skips their masks."""
    keep = torch.arange(len(iou_preds), device=iou_preds.device)
    return keep[iou_preds > pred_iou_thresh] if pred_iou_thresh > 0.0 else keep


def uncompress(rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO compressed RLEs as the references' uncompressed ones (run lengths in a list)."""
    if not rles:
        return []
    height, width = rles[0]["size"]
    reserve(height * width * len(rles))
    masks = torch.as_tensor(mask_utils.decode(rles)).permute(2, 0, 1)
    return mask_to_rle_pytorch(masks)


def clean_small_regions(
    data: MaskData, min_area: int, nms_thresh: float, postprocess: Callable[[MaskData, int, float], MaskData]
) -> MaskData:
    """The reference's small-region cleanup (`postprocess`, its postprocess_small_regions) on our
    compressed RLEs: it works on uncompressed ones, so they are converted around it."""
    data["rles"] = uncompress(data["rles"])
    data = postprocess(data, min_area, nms_thresh)
    data["rles"] = [mask_utils.frPyObjects(rle, *rle["size"]) for rle in data["rles"]]
    return data


def records(data: MaskData, output_mode: str) -> list[dict[str, Any]]:
    """The references' records of the masks in `data`, the segmentation in `output_mode`
    (coco_rle: builtins for the wire, binary_mask, or uncompressed_rle)."""
    rles = data["rles"]
    areas = rle_areas(rles)
    if output_mode == "coco_rle":
        segmentations: list[Any] = [rle_to_builtins(r) for r in rles]
    elif output_mode == "binary_mask":
        segmentations = [mask_utils.decode(r).astype(bool) for r in rles]
    else:
        segmentations = uncompress(rles)
    return [
        amg_record(
            segmentations[i],
            areas[i],
            box_xyxy_to_xywh(data["boxes"][i]).tolist(),
            data["iou_preds"][i].item(),
            [data["points"][i].tolist()],
            data["stability_score"][i].item(),
            box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
        )
        for i in range(len(rles))
    ]
