"""SAM 3's reference: transformers' own pipeline (Sam3Processor, Sam3Model, the processor's
post_process_instance_segmentation), in float32, its answer written as our concept records."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from sam_fast_serve.common.concepts import Concepts
from sam_fast_serve.common.records import concept_record, rle_to_builtins
from sam_fast_serve.models.sam3.build import Sam3Net


@torch.inference_mode()
def reference_concepts(net: Sam3Net, image: np.ndarray, concepts: Concepts) -> list[dict[str, Any]]:
    """Every concept of `concepts` on `image` as transformers answers it: one processor and model
    call per phrase (the pipeline takes one text a call), with the exemplar boxes."""
    processor, model = net.processor, net.model
    records: list[dict[str, Any]] = []
    for phrase in concepts.texts:
        inputs: dict[str, Any] = {"images": image, "text": phrase, "return_tensors": "pt"}
        if concepts.boxes is not None and concepts.labels is not None:
            inputs.update(input_boxes=[concepts.boxes.tolist()], input_boxes_labels=[concepts.labels.tolist()])
        batch = processor(**inputs)
        outputs = model(**batch)
        (found,) = processor.post_process_instance_segmentation(
            outputs, concepts.threshold, concepts.mask_threshold, batch["original_sizes"].tolist()
        )
        masks = np.asfortranarray(found["masks"].numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(masks) if len(found["scores"]) else []
        for rle, score, (x0, y0, x1, y1) in zip(rles, found["scores"].tolist(), found["boxes"].tolist(), strict=True):
            area = int(mask_utils.area(rle))
            records.append(concept_record(phrase, rle_to_builtins(rle), area, [x0, y0, x1 - x0, y1 - y0], score))
    return records
