"""SAM 3's references: transformers' own pipelines in float32. Concepts: Sam3Processor, Sam3Model
and the processor's post_process_instance_segmentation, written as our concept records. Prompts:
Sam3TrackerProcessor, Sam3TrackerModel and post_process_masks, the tracker's weights taken from
the published (Sam3VideoModel) form by the renaming transformers' conversion_mapping.py gives for
sam3_tracker (transformers 5.23's Sam3TrackerModel.from_pretrained of such a folder leaves the
tracker's decoder at random weights, with a "model of type sam3_video" warning)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from transformers import Sam3TrackerConfig, Sam3TrackerModel, Sam3TrackerProcessor

from sam_fast_serve.common.concepts import Concepts
from sam_fast_serve.common.prompts import Prompts
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


# transformers' conversion_mapping.py, "sam3_tracker": checkpoint key -> Sam3TrackerModel key.
_RENAMES = (
    (r"^detector_model\.vision_encoder\.backbone\.", "vision_encoder.backbone."),
    (r"^tracker_neck\.", "vision_encoder.neck."),
    (r"^tracker_model\.", ""),
)


def reference_tracker(net: Sam3Net) -> Sam3TrackerModel:
    """transformers' Sam3TrackerModel with the weights of `net`'s whole model: its vision encoder
    the detector's trunk with the tracker's neck (three levels, as the tracker reads them)."""
    assert net.video is not None
    tracker_config: Any = net.video.config.tracker_config
    vision = tracker_config.vision_config.to_dict()
    vision["scale_factors"] = vision["scale_factors"][:3]
    config = Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config=tracker_config.prompt_encoder_config.to_dict(),
        mask_decoder_config=tracker_config.mask_decoder_config.to_dict(),
    )
    model = Sam3TrackerModel(config)
    state = {}
    for key, tensor in net.video.state_dict().items():
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                state[re.sub(pattern, replacement, key)] = tensor
                break
    missing, _ = model.load_state_dict(state, strict=False)
    assert not missing, missing
    return model.eval()


@torch.inference_mode()
def reference_prompts(
    net: Sam3Net, model: Sam3TrackerModel, image: np.ndarray, prompts: Prompts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, C, H, W) masks, (P, C) IoUs and (P, C, h, w) low-res logits of `prompts` as transformers
    answers them: each box one prompt, the points joining every box."""
    processor = Sam3TrackerProcessor(image_processor=net.processor.image_processor)
    count = prompts.count
    inputs: dict = {"images": image, "return_tensors": "pt"}
    if prompts.points is not None and prompts.labels is not None:
        inputs["input_points"] = [[prompts.points.tolist()] * count]
        inputs["input_labels"] = [[prompts.labels.tolist()] * count]
    if prompts.boxes is not None:
        inputs["input_boxes"] = [prompts.boxes.tolist()]
    batch = processor(**inputs)
    masks = None if prompts.mask_input is None else torch.as_tensor(prompts.mask_input)[None, None]
    outputs = model(
        pixel_values=batch["pixel_values"],
        input_points=batch.get("input_points"),
        input_labels=batch.get("input_labels"),
        input_boxes=batch.get("input_boxes"),
        input_masks=masks,
        multimask_output=prompts.multimask,
    )
    (found,) = processor.post_process_masks(outputs.pred_masks, batch["original_sizes"])
    return found, outputs.iou_scores[0], outputs.pred_masks[0]
