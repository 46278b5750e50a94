"""The engine, driven through the service from image file bytes, gives the reference's masks.

Reference: segment_anything.SamAutomaticMaskGenerator in fp32 on the same random-weight vit_b,
on a real photo, keep-all settings (thresholds 0, NMS off) so every mask is compared.
"""

import numpy as np
import pytest
import torch
from conftest import KEEP_ALL, encode
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator

from sam_fast_serve.agreement import match_masks
from sam_fast_serve.build import sam_model_fast_registry
from sam_fast_serve.service import MaskService
from sam_fast_serve.wire import decode_pickled

SETTINGS = {"points_per_side": 8, "points_per_batch": 64, **KEEP_ALL}


@pytest.fixture(scope="module")
def reference_model(random_checkpoint):
    return sam_model_fast_registry["vit_b"](str(random_checkpoint))


@pytest.fixture(scope="module")
def reference_masks(reference_model, astronaut):
    torch.manual_seed(0)
    return ReferenceGenerator(reference_model, output_mode="coco_rle", **SETTINGS).generate(astronaut)


@pytest.fixture(scope="module")
def fp32_service(random_checkpoint, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model_dir")
    (model_dir / random_checkpoint.name).symlink_to(random_checkpoint)
    section = {"model_type": "vit_b", "sam_checkpoint": random_checkpoint.name, "dtype": "float32", **SETTINGS}
    return MaskService.load(section, model_dir, gpu_id=None)


def test_service_matches_reference_one_to_one(fp32_service, reference_masks, astronaut):
    reply = fp32_service.handle([({"body": bytearray(encode(astronaut))}, {})])[0]
    assert reply.status == 200
    ours = decode_pickled(reply.body)
    assert len(reference_masks) == len(ours) == 8 * 8 * 3
    ious, unmatched, leftover = match_masks(reference_masks, ours)
    assert unmatched == 0 and leftover == 0
    assert min(ious) >= 0.99, sorted(ious)[:5]
    ref_scores = sorted((tuple(a["point_coords"][0]), a["predicted_iou"]) for a in reference_masks)
    our_scores = sorted((tuple(a["point_coords"][0]), a["predicted_iou"]) for a in ours)
    assert np.allclose([s for _, s in ref_scores], [s for _, s in our_scores], atol=1e-3)


def test_channel_order_matters_so_the_comparison_has_teeth(reference_model, reference_masks, astronaut):
    # Feeding BGR instead of RGB (the upstream example's bug) changes the masks: an engine that
    # swapped channels could not pass the test above.
    swapped = ReferenceGenerator(reference_model, output_mode="coco_rle", **SETTINGS).generate(
        np.ascontiguousarray(astronaut[..., ::-1])
    )
    ious, _, _ = match_masks(reference_masks, swapped)
    assert min(ious) < 0.99
