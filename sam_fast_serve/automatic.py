"""SamAutomaticMaskGenerator with the fast decoder, batched image encoding, early IoU filtering
and RLE done by pycocotools' C encoder.

It subclasses segment_anything's generator and keeps its crop handling and NMS. What changes:
the image embedding (pinned in batches of `process_batch_size`), the per-batch decoding
(`_process_batch`), and the RLE format kept between stages: COCO's compressed RLE (counts as
bytes) instead of Python lists of run lengths, which the reference deep-copies on every
concatenation and encodes in a Python loop (for fragmented masks that took longer than the model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything.modeling import Sam
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

from .fast_decoder import FastMaskDecoder
from .predictor import FastSamPredictor
from .records import amg_record, rle_to_builtins
from .rle import encode_masks, reserve, rle_areas

# Low-resolution logits are computed for at most this many masks at a time (256 KiB each).
MASKS_PER_DECODE = 256
# On the CPU, upsampling, stability, boxes and RLE run on a few masks at a time, so that each
# full-size float intermediate (the reference upsamples to 1024 x 1024 first) stays below glibc's
# largest mmap threshold (32 MiB) and its memory is reused instead of page-faulted in afresh: this
# halves the upsampling time (3072 masks of a 512 x 512 photo: 6.3 s in chunks of 256, 2.9 s in
# chunks of 4). Other devices take a whole decode chunk at once.
UPSAMPLE_CHUNK_BYTES = 16 * 2**20


class SamAutomaticMaskGenerator(ReferenceGenerator):
    """Drop-in for segment_anything.SamAutomaticMaskGenerator (same arguments and records), plus:

    process_batch_size: images (or crops) per image-encoder call in `generate_batch`.
    predictor: a FastSamPredictor for `model`, to share its decoder and embedding cache between
        generators; by default a new one with a FastMaskDecoder in `decoder_dtype` and no cache.
    """

    def __init__(
        self,
        model: Sam,
        *args: Any,
        process_batch_size: int = 1,
        predictor: FastSamPredictor | None = None,
        decoder_dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self.process_batch_size = process_batch_size
        if predictor is None:
            predictor = FastSamPredictor(model, FastMaskDecoder(model.mask_decoder, decoder_dtype))
        self.predictor = predictor

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for one RGB uint8 (H, W, 3) image: the same records as the reference's `generate`."""
        mask_data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            # The reference's small-region cleanup works on uncompressed RLE: convert around it.
            mask_data["rles"] = _uncompress(mask_data["rles"])
            mask_data = self.postprocess_small_regions(
                mask_data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
            mask_data["rles"] = [mask_utils.frPyObjects(rle, *rle["size"]) for rle in mask_data["rles"]]
        return self._records(mask_data)

    def _records(self, data: MaskData) -> list[dict[str, Any]]:
        rles = data["rles"]
        areas = rle_areas(rles)
        if self.output_mode == "coco_rle":
            segmentations: list[Any] = [rle_to_builtins(r) for r in rles]
        elif self.output_mode == "binary_mask":
            segmentations = [mask_utils.decode(r).astype(bool) for r in rles]
        else:
            segmentations = _uncompress(rles)
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

    @contextmanager
    def pinned(self, images: Sequence[np.ndarray]) -> Iterator[None]:
        """Within: the embeddings of `images` (and of their crops) are computed, `process_batch_size`
        per encoder call, and kept for `generate`."""
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

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        predictor = self.predictor
        decoder = predictor.decoder
        transformed = predictor.transform.apply_coords(points, im_size)
        coords = torch.as_tensor(transformed, device=predictor.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, _ = self.predictor.model.prompt_encoder(
            points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        with predictor.clock.stage("mask_decoder"):
            tokens = decoder.run_transformer(predictor.image_state(), sparse)
        # Multimask output: mask tokens 1..3, flattened point-major like the reference.
        iou_preds = tokens.iou_pred[:, 1:].flatten()
        keep = torch.arange(iou_preds.numel(), device=iou_preds.device)
        if self.pred_iou_thresh > 0.0:
            # The reference drops these after upsampling; dropping them first skips their masks.
            keep = keep[iou_preds > self.pred_iou_thresh]
        points_t = torch.as_tensor(points)  # stays on the CPU, as in the reference
        data = MaskData()
        img_size = predictor.model.image_encoder.img_size
        largest = max(img_size * img_size, orig_size[0] * orig_size[1]) * 4
        per_upsample = max(1, UPSAMPLE_CHUNK_BYTES // largest) if predictor.device.type == "cpu" else MASKS_PER_DECODE
        for chunk in keep.split(MASKS_PER_DECODE):
            prompt_idx = torch.div(chunk, 3, rounding_mode="floor")
            with predictor.clock.stage("mask_decoder"):
                low_res = decoder.mask_logits(tokens, prompt_idx, chunk % 3 + 1)[:, None]
            for rows in torch.arange(len(chunk)).split(per_upsample):
                masks = predictor.upsample(low_res[rows])
                chunk_data = MaskData(
                    masks=masks[:, 0], iou_preds=iou_preds[chunk[rows]], points=points_t[prompt_idx[rows].cpu()]
                )
                data.cat(self._masks_to_rles(chunk_data, crop_box, orig_size))
        if not data._stats:
            data = self._empty_batch()
        return data

    def _masks_to_rles(self, data: MaskData, crop_box: list[int], orig_size: tuple[int, ...]) -> MaskData:
        """Stability filter, thresholding, boxes, crop-edge filter and RLE, as the reference does."""
        orig_h, orig_w = orig_size
        threshold = self.predictor.model.mask_threshold
        data["stability_score"] = calculate_stability_score(data["masks"], threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["rles"] = encode_masks(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
        del data["masks"]
        return data

    def _empty_batch(self) -> MaskData:
        # The reference always returns these keys, even with nothing kept; NMS downstream needs them.
        device = self.predictor.device
        return MaskData(
            iou_preds=torch.zeros(0, device=device),
            points=torch.zeros(0, 2, dtype=torch.float64),
            stability_score=torch.zeros(0, device=device),
            boxes=torch.zeros(0, 4, dtype=torch.int64, device=device),
            rles=[],
        )


def _uncompress(rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO compressed RLEs as segment_anything's uncompressed ones (run lengths in a list)."""
    if not rles:
        return []
    height, width = rles[0]["size"]
    reserve(height * width * len(rles))
    masks = torch.as_tensor(mask_utils.decode(rles)).permute(2, 0, 1)
    return mask_to_rle_pytorch(masks)
