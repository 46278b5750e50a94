"""Every option of the engine's generator gives segment_anything's masks, one to one.

The model is a SAM with a small image encoder (2 blocks of 96 channels) and the real mask
decoder and prompt encoder, built by segment_anything's own builder, random weights: the encoder
then costs little, so each option can be compared against the reference (fp32) on its own. Thresholds are placed in the widest gap
between the reference's own scores, so a rounding difference cannot move a mask across them.
"""

from __future__ import annotations

import copy
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import Sam

from harness.agreement import match_masks
from harness.archives import KEEP_ALL
from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
from sam_fast_serve.models.sam1.build import prepare_model

GRID = {"points_per_side": 4, "output_mode": "coco_rle"}
LOGIT_SCALE = 30.0


def small_sam() -> Sam:
    """segment_anything's own SAM builder with a 2-block, 96-channel image encoder."""
    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    with torch.no_grad():
        # Random hypernetworks give logits so close to 0 that every stability score is 0 and
        # the stability filter would have nothing to sort; larger logits spread the scores.
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
    return sam


@pytest.fixture(scope="module")
def reference_model() -> Sam:
    return small_sam()


@pytest.fixture(scope="module")
def engine_models(reference_model):
    """The same weights prepared as the service prepares them: {dtype: model}."""
    return {
        dtype: prepare_model(copy.deepcopy(reference_model), torch.device("cpu"), dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }


@pytest.fixture(scope="module")
def photo(chelsea) -> np.ndarray:
    return chelsea  # 300 x 451: not square, so masks are cropped out of the padded input


def reference(model: Sam, image: np.ndarray, **options: Any) -> list[dict[str, Any]]:
    return ReferenceGenerator(model, **{**GRID, **options}).generate(image)


def engine(models, image: np.ndarray, dtype=torch.float32, **options: Any) -> list[dict[str, Any]]:
    return SamAutomaticMaskGenerator(models[dtype], decoder_dtype=dtype, **{**GRID, **options}).generate(image)


def assert_same_masks(expected: list[dict[str, Any]], ours: list[dict[str, Any]]) -> None:
    assert len(expected) > 0
    ious, unmatched, leftover = match_masks(expected, ours)
    assert (unmatched, leftover) == (0, 0), f"{len(expected)} reference masks, {len(ours)} ours"
    assert min(ious) >= 0.99, sorted(ious)[:5]
    for key in ("predicted_iou", "stability_score"):
        assert np.allclose(sorted(a[key] for a in expected), sorted(a[key] for a in ours), atol=1e-3), key
    assert sorted(a["area"] for a in expected) == pytest.approx(sorted(a["area"] for a in ours), rel=0.02, abs=5)


def threshold_between(values: list[float]) -> float:
    """A threshold > 0 (the reference filters only then) in the widest gap between consecutive
    positive values of the middle half, so that about half of them pass and none lies within
    rounding distance of it."""
    ordered = sorted(v for v in values if v > 0)
    middle = ordered[len(ordered) // 4 : 3 * len(ordered) // 4 + 1]
    gaps = [(b - a, (a + b) / 2) for a, b in zip(middle, middle[1:])]
    width, threshold = max(gaps)
    assert width > 1e-4, "the reference's scores are too close together to place a threshold"
    return threshold


@pytest.fixture(scope="module")
def keep_all_reference(reference_model, photo):
    return reference(reference_model, photo, **KEEP_ALL)


def test_keep_all(engine_models, keep_all_reference, photo):
    assert len(keep_all_reference) == 4 * 4 * 3
    assert_same_masks(keep_all_reference, engine(engine_models, photo, **KEEP_ALL))


# The predicted-IoU filter runs before the masks are upsampled in the engine, after in the reference.
@pytest.mark.parametrize(
    "option, score", [("pred_iou_thresh", "predicted_iou"), ("stability_score_thresh", "stability_score")]
)
def test_score_filters(reference_model, engine_models, keep_all_reference, photo, option, score):
    options = {**KEEP_ALL, option: threshold_between([a[score] for a in keep_all_reference])}
    expected = reference(reference_model, photo, **options)
    assert 0 < len(expected) < len(keep_all_reference)
    assert_same_masks(expected, engine(engine_models, photo, **options))


def test_box_nms(reference_model, engine_models, keep_all_reference, photo):
    options = {**KEEP_ALL, "box_nms_thresh": 0.7}
    expected = reference(reference_model, photo, **options)
    assert 0 < len(expected) < len(keep_all_reference)
    assert_same_masks(expected, engine(engine_models, photo, **options))


def test_crop_layers(reference_model, engine_models, photo):
    # One layer of 4 overlapping crops plus the whole image, crop NMS between them. The random
    # masks of the crops touch the crop edges, so both generators drop them (the crop-edge filter)
    # and keep only whole-image masks; the engine must still have encoded and decoded every crop.
    options = {**GRID, **KEEP_ALL, "crop_n_layers": 1, "crop_nms_thresh": 0.7, "points_per_side": 2}
    expected = ReferenceGenerator(reference_model, **options).generate(photo)
    generator = SamAutomaticMaskGenerator(engine_models[torch.float32], **options)
    assert_same_masks(expected, generator.generate(photo))
    assert generator.predictor.encoder_calls == 1 + 4


def test_small_region_cleanup(reference_model, engine_models, keep_all_reference, photo):
    options = {**KEEP_ALL, "min_mask_region_area": 200}
    expected = reference(reference_model, photo, **options)
    areas = sorted(a["area"] for a in expected)
    assert areas != sorted(a["area"] for a in keep_all_reference), "the cleanup changed no mask: it tests nothing"
    assert_same_masks(expected, engine(engine_models, photo, **options))


def as_coco_rle(annotations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same annotations with binary-mask or uncompressed-RLE segmentations as COCO RLE."""
    converted = []
    for ann in annotations:
        seg = ann["segmentation"]
        if isinstance(seg, np.ndarray):
            seg = mask_utils.encode(np.asfortranarray(seg.astype(np.uint8)))
        else:
            seg = mask_utils.frPyObjects(seg, *seg["size"])
        converted.append({**ann, "segmentation": seg})
    return converted


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle"])
def test_output_modes(reference_model, engine_models, photo, output_mode):
    expected = reference(reference_model, photo, **KEEP_ALL, output_mode=output_mode)
    ours = engine(engine_models, photo, **KEEP_ALL, output_mode=output_mode)
    for ann in ours:
        if output_mode == "binary_mask":
            assert ann["segmentation"].dtype == bool and ann["segmentation"].shape == photo.shape[:2]
        else:
            assert isinstance(ann["segmentation"]["counts"], list)
    assert_same_masks(as_coco_rle(expected), as_coco_rle(ours))


def test_large_image_upsampled_in_chunks(reference_model, engine_models, photo):
    # Larger than the 1024 model input: the second interpolation upsamples, two masks per chunk.
    large = cv2.resize(photo, (1700, 1130), interpolation=cv2.INTER_LINEAR)
    options = {**KEEP_ALL, "points_per_side": 2}
    assert_same_masks(reference(reference_model, large, **options), engine(engine_models, large, **options))


def test_batched_image_encoding(engine_models, photo, astronaut):
    # generate_batch encodes both images in one encoder call; each result equals generate's.
    generator = SamAutomaticMaskGenerator(engine_models[torch.float32], process_batch_size=2, **GRID, **KEEP_ALL)
    batched = generator.generate_batch([photo, astronaut])
    assert generator.predictor.encoder_calls == 1
    for image, result in zip([photo, astronaut], batched):
        assert_same_masks(engine(engine_models, image, **KEEP_ALL), result)


def test_bfloat16_agreement(engine_models, keep_all_reference, photo):
    # bf16 image encoder and decoder (scores, stability and NMS stay fp32): the target is
    # >= 97% of masks at IoU >= 0.9.
    ours = engine(engine_models, photo, dtype=torch.bfloat16, **KEEP_ALL)
    ious, unmatched, leftover = match_masks(keep_all_reference, ours)
    assert (unmatched, leftover) == (0, 0)
    assert np.mean(np.array(ious) >= 0.9) >= 0.97, sorted(ious)[:5]


def test_compiled_encoder(reference_model, keep_all_reference, photo, tmp_path, monkeypatch):
    # `compile: true`: the encoder (with the fast blocks) through torch.compile, its own cache.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = prepare_model(copy.deepcopy(reference_model), torch.device("cpu"), torch.float32, compile_encoder=True)
    assert isinstance(model.image_encoder, torch._dynamo.eval_frame.OptimizedModule)
    assert_same_masks(keep_all_reference, engine({torch.float32: model}, photo, **KEEP_ALL))
