"""The engine, driven through the service from image file bytes, gives the reference's masks.

Reference: segment_anything.SamAutomaticMaskGenerator in fp32 on the same random-weight vit_b,
on a real photo, keep-all settings (thresholds 0, NMS off) so every mask is compared.
"""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator

from harness.agreement import match_masks
from harness.archives import KEEP_ALL
from harness.files import encode
from sam_fast_serve.common.wire import decode_pickled

SETTINGS = {"points_per_side": 8, "points_per_batch": 64, **KEEP_ALL}


@pytest.fixture(scope="module")
def reference_masks(reference_sam, astronaut):
    return ReferenceGenerator(reference_sam, output_mode="coco_rle", **SETTINGS).generate(astronaut)


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


def test_channel_order_matters_so_the_comparison_has_teeth(fp32_service, reference_masks, astronaut):
    # The same photo sent in BGR instead of RGB (the upstream example's bug) gives other masks: an
    # engine that swapped channels could not pass the test above.
    swapped = bytearray(encode(np.ascontiguousarray(astronaut[..., ::-1])))
    reply = fp32_service.handle([({"body": swapped}, {})])[0]
    assert reply.status == 200
    ious, _, _ = match_masks(reference_masks, decode_pickled(reply.body))
    assert min(ious) < 0.99
