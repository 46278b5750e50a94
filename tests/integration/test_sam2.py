"""SAM 2.1 through every path SAM 1 has, against SAM 2's own code: the automatic generator against
SAM2AutomaticMaskGenerator and prompts against SAM2ImagePredictor (fp32, one to one at IoU >= 0.99),
on the test architecture for every option and on the full-size sam2.1_hiera_tiny once; the
service's options, errors and image_id on SAM 2."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor

from harness.agreement import match_masks
from harness.archives import KEEP_ALL, model_type_of
from harness.files import encode
from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2 import build
from sam_fast_serve.models.sam2.automatic import Sam2AutomaticMaskGenerator
from sam_fast_serve.models.sam2.components import labelling_sam2s_own
from sam_fast_serve.models.sam2.predictor import Sam2Predictor
from sam_fast_serve.server.service import MaskService

GRID = {"points_per_side": 4, "points_per_batch": 64}


@pytest.fixture(scope="module")
def test_net(random_sam2_checkpoint):
    return build(model_type("test_sam2.1_hiera"), str(random_sam2_checkpoint))


@pytest.fixture(scope="module")
def photo(astronaut):
    return np.ascontiguousarray(astronaut[::2, ::2])  # 256 x 256: a quarter of the upsampling work


def agree(reference: list[dict], ours: list[dict]) -> list[float]:
    ious, unmatched, leftover = match_masks(reference, ours)
    assert unmatched == 0 and leftover == 0, (len(reference), len(ours))
    return ious


def iou_quantile(net, image: np.ndarray, share: float) -> float:
    """The pred_iou_thresh that keeps about `share` of the grid's masks (SAM 2's predicted IoUs):
    halfway between two predictions, so that rounding (ours against SAM 2's) cannot move one across."""
    generator = SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **GRID, **KEEP_ALL)
    scores = sorted(record["predicted_iou"] for record in generator.generate(image))
    first_kept = int(len(scores) * (1 - share))
    return float(scores[first_kept - 1] + scores[first_kept]) / 2


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_m2m": True, "points_per_side": 3},
        {"multimask_output": False},
        {"crop_n_layers": 1, "box_nms_thresh": 0.7, "points_per_side": 2},
        # Random weights' logits are small: with SAM 2's offset of 1 every stability score is 0.
        {"stability_score_offset": 0.01, "stability_score_thresh": 0.85},
    ],
    ids=["keep-all", "m2m", "single-mask", "crops", "stability"],
)
def test_generator_matches_sam2_one_to_one(test_net, photo, options):
    settings = {**GRID, **KEEP_ALL, **options}
    reference = SAM2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    ours = Sam2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    assert 0 < len(reference)
    assert min(agree(reference, ours)) >= 0.99
    assert np.allclose(
        sorted(r["predicted_iou"] for r in reference), sorted(r["predicted_iou"] for r in ours), atol=1e-3
    )


def test_thirty_percent_kept_as_sam2_keeps_them(test_net, photo):
    settings = {**GRID, **KEEP_ALL, "pred_iou_thresh": iou_quantile(test_net, photo, 0.3)}
    reference = SAM2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    ours = Sam2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    assert 0.2 * 4 * 4 * 3 < len(reference) < 0.4 * 4 * 4 * 3
    assert min(agree(reference, ours)) >= 0.99


def test_hole_filling_is_sam2s_with_its_extension(test_net, photo):
    # Without _C, SAM 2 skips hole filling with a warning; with connected components (ours, tested
    # against scipy in tests/unit/test_sam2_components.py) in its place it fills them, as we do.
    settings = {**GRID, **KEEP_ALL, "min_mask_region_area": 400, "points_per_side": 3}
    ours = Sam2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    with pytest.warns(UserWarning, match="Skipping the post-processing"):
        skipped = SAM2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    with labelling_sam2s_own():
        filled = SAM2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **settings).generate(photo)
    assert min(agree(filled, ours)) >= 0.99
    assert min(agree(skipped, ours)) < 0.99  # the fill changed masks: this test can tell


def test_full_size_hiera_tiny_matches_sam2(tmp_path, astronaut):
    from sam_fast_serve.tools.cli import save_random_checkpoint

    checkpoint = save_random_checkpoint(tmp_path / "random_sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny", seed=0)
    net = build(model_type("sam2.1_hiera_tiny"), str(checkpoint))
    settings = {"points_per_side": 4, "points_per_batch": 16, **KEEP_ALL}
    reference = SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **settings).generate(astronaut)
    ours = Sam2AutomaticMaskGenerator(net, output_mode="coco_rle", **settings).generate(astronaut)
    assert len(reference) == 4 * 4 * 3
    assert min(agree(reference, ours)) >= 0.99


@pytest.fixture(scope="module")
def reference_predictor(test_net, photo):
    predictor = SAM2ImagePredictor(test_net)
    predictor.set_image(photo)
    return predictor


@pytest.fixture(scope="module")
def our_predictor(test_net, photo):
    predictor = Sam2Predictor(test_net, torch.float32)
    predictor.set_image(photo)
    return predictor


def _rles(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))


@pytest.mark.parametrize(
    "prompt",
    [
        {"points": [[120.0, 80.0]], "labels": [1]},
        {"points": [[120.0, 80.0], [30.0, 200.0]], "labels": [1, 0]},
        {"boxes": [[40.0, 20.0, 200.0, 180.0]]},
        {"boxes": [[40.0, 20.0, 200.0, 180.0]], "points": [[120.0, 80.0]], "labels": [1]},
    ],
    ids=["point", "points", "box", "box-and-point"],
)
@pytest.mark.parametrize("multimask", [True, False])
def test_prompts_match_sam2_image_predictor(reference_predictor, our_predictor, prompt, multimask):
    from sam_fast_serve.common.prompts import parse_prompts

    parsed = parse_prompts({**prompt, "multimask": multimask}, our_predictor.original_size, 256)
    box = np.asarray(prompt["boxes"][0]) if "boxes" in prompt else None
    points = np.asarray(prompt["points"]) if "points" in prompt else None
    labels = np.asarray(prompt["labels"]) if "labels" in prompt else None
    ref_masks, ref_iou, ref_low = reference_predictor.predict(points, labels, box, multimask_output=multimask)
    masks, iou, low_res = our_predictor.predict_prompts(parsed)
    assert masks.shape[:2] == (1, 3 if multimask else 1)
    ious = mask_utils.iou(_rles(masks[0].numpy()), _rles(ref_masks > 0), [0] * len(ref_masks)).diagonal()
    assert ious.min() >= 0.99, ious
    assert np.allclose(iou[0].numpy(), ref_iou, atol=1e-3)
    assert np.allclose(low_res[0].numpy(), ref_low, atol=1e-2)


def test_a_mask_prompt_matches_sam2_image_predictor(reference_predictor, our_predictor):
    from sam_fast_serve.common.prompts import logits_payload, parse_prompts

    _, _, first = reference_predictor.predict(np.array([[120.0, 80.0]]), np.array([1]), multimask_output=True)
    mask = first[:1]
    for prompt in ({"points": [[120.0, 80.0], [30.0, 200.0]], "labels": [1, 0]}, {}):
        parsed = parse_prompts({**prompt, "mask_input": logits_payload(mask)}, our_predictor.original_size, 256)
        points = np.asarray(prompt["points"]) if prompt else None
        labels = np.asarray(prompt["labels"]) if prompt else None
        ref_masks, ref_iou, _ = reference_predictor.predict(points, labels, mask_input=mask, multimask_output=False)
        masks, iou, _ = our_predictor.predict_prompts(parsed)
        ious = mask_utils.iou(_rles(masks[0].numpy()), _rles(ref_masks > 0), [0]).diagonal()
        assert ious.min() >= 0.99 and np.allclose(iou[0].numpy(), ref_iou, atol=1e-3)


@pytest.fixture(scope="module")
def sam2_service(random_sam2_checkpoint, tmp_path_factory, gpu_id):
    model_dir = tmp_path_factory.mktemp("sam2_model")
    (model_dir / random_sam2_checkpoint.name).symlink_to(random_sam2_checkpoint)
    section = {"model_type": "test_sam2.1_hiera", "sam_checkpoint": random_sam2_checkpoint.name, **GRID, **KEEP_ALL}
    return MaskService.load(section, model_dir, gpu_id=gpu_id)


def ask(service: MaskService, document: dict) -> tuple[int, dict]:
    reply = service.handle([({"body": document}, {"Accept": "application/json"})])[0]
    return reply.status, json.loads(reply.body)


def test_service_answers_sam2_with_the_same_records_and_wire(sam2_service, test_net, photo):
    reply = sam2_service.handle([({"body": bytearray(encode(photo))}, {})])[0]
    assert reply.status == 200
    ours = decode_pickled(reply.body)
    reference = SAM2AutomaticMaskGenerator(test_net, output_mode="coco_rle", **GRID, **KEEP_ALL).generate(photo)
    assert [sorted(r) for r in ours] == [sorted(r) for r in reference]
    # The default dtype (bf16 on a CPU that computes it natively) agrees with SAM 2 in fp32.
    ious = agree(reference, ours)
    assert np.mean(np.asarray(ious) >= 0.9) >= 0.97


def test_sam2_options_and_their_errors(sam2_service, photo):
    image = base64.b64encode(encode(photo)).decode()
    status, single = ask(sam2_service, {"image": image, "multimask_output": False, "use_m2m": True})
    assert status == 200 and len(single) == 4 * 4
    status, wrong = ask(sam2_service, {"image": image, "use_m2m": "yes"})
    assert status == 422 and "use_m2m" in wrong["message"]


def test_sam1_refuses_sam2_only_options(random_checkpoint, tmp_path, photo, gpu_id):
    (tmp_path / random_checkpoint.name).symlink_to(random_checkpoint)
    sam1 = MaskService.load({"model_type": "test_vit", "sam_checkpoint": random_checkpoint.name}, tmp_path, gpu_id)
    image = base64.b64encode(encode(photo)).decode()
    status, refused = ask(sam1, {"image": image, "use_m2m": True})
    assert status == 422 and "'use_m2m'" in refused["message"] and "test_vit" in refused["message"]
    with pytest.raises(ConfigError, match="'multimask_output'.*test_vit"):
        MaskService.load(
            {"model_type": "test_vit", "sam_checkpoint": random_checkpoint.name, "multimask_output": False},
            tmp_path,
            gpu_id,
        )


def test_sam2_prompts_by_image_id_skip_the_encoder(sam2_service, photo):
    image = base64.b64encode(encode(photo)).decode()
    status, first = ask(sam2_service, {"image": image, "points": [[100, 120]], "boxes": [[10, 10, 200, 220]]})
    assert status == 200 and len(first["prompts"]) == 1 and len(first["prompts"][0]["masks"]) == 1
    calls = sam2_service.engine.predictor.encoder_calls
    status, again = ask(
        sam2_service, {"image_id": first["image_id"], "points": [[100, 120]], "boxes": [[10, 10, 200, 220]]}
    )
    assert status == 200 and again == first
    assert sam2_service.engine.predictor.encoder_calls == calls


def test_a_sam1_checkpoint_is_no_sam2_checkpoint(random_checkpoint):
    with pytest.raises(ConfigError, match="not a SAM 2 checkpoint"):
        build(model_type("test_sam2.1_hiera"), str(random_checkpoint))


def test_a_sam2_checkpoint_is_no_sam1_checkpoint(random_sam2_checkpoint, random_checkpoint):
    from sam_fast_serve.models.sam1 import build as build_sam1

    with pytest.raises(ConfigError, match="not a SAM 1 checkpoint"):
        build_sam1(model_type("test_vit"), str(random_sam2_checkpoint))
    with pytest.raises(ConfigError, match="does not fit vit_b"):
        build_sam1(model_type("vit_b"), str(random_checkpoint))


@pytest.mark.parametrize("checkpoint", ["random_checkpoint", "random_sam2_checkpoint"])
def test_crop_layers_with_no_mask_kept_give_no_records(request, checkpoint, photo, tmp_path, gpu_id):
    # The references' crop NMS fails on a crop without masks; a request must get an empty answer.
    path = request.getfixturevalue(checkpoint)
    (tmp_path / path.name).symlink_to(path)
    section = {"model_type": model_type_of(path), "sam_checkpoint": path.name, "crop_n_layers": 1,
               "points_per_side": 2, "pred_iou_thresh": 1.0}  # fmt: skip
    service = MaskService.load(section, tmp_path, gpu_id)
    reply = service.handle([({"body": bytearray(encode(photo))}, {})])[0]
    assert reply.status == 200 and decode_pickled(reply.body) == []
