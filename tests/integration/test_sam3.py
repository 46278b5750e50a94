"""SAM 3's concept path against transformers' own pipeline (Sam3Processor + Sam3Model +
post_process_instance_segmentation, fp32): every instance matched one to one at IoU >= 0.99 with
its score within 1e-3; its prompt path against Sam3TrackerProcessor + Sam3TrackerModel +
post_process_masks: every mask at IoU >= 0.99, its predicted IoU within 1e-3. Each on the test
architecture for each kind of request and on the full-size model once; the service's concept and
prompt requests, cache, answer formats and refusals, and a checkpoint without the tracker."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from harness.agreement import match_instances
from harness.files import encode
from harness.sam3 import reference_concepts, reference_prompts, reference_tracker
from sam_fast_serve.common.concepts import EXEMPLAR_CONCEPT, parse_concepts
from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.common.prompts import logits_payload, parse_prompts
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.models.precision import resolve_precision
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam3 import build, prepare
from sam_fast_serve.models.sam3.build import Sam3Net, save_checkpoint
from sam_fast_serve.models.sam3.predictor import Sam3Predictor
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint

MAX_MASKS = 1000  # the service's default cap
# Random weights score every query about 0.25: threshold 0 keeps them all (20 in the test architecture).
KEEP_ALL = {"threshold": 0.0}
REQUESTS = {
    "text": {"text": "nucleus"},
    "texts": {"text": ["nucleus", "a scratch"]},
    "text and exemplars": {
        "text": "cat",
        "exemplar_boxes": [[40, 30, 200, 180], [10, 10, 60, 50]],
        "exemplar_labels": [1, 0],
    },
    "exemplars": {"exemplar_boxes": [[40, 30, 200, 180]]},
}

LOW_RES = model_type("test_sam3").mask_input_side
MASK = np.random.default_rng(0).normal(size=(LOW_RES, LOW_RES)).astype(np.float32)
PROMPTS = {
    "a click": {"points": [[200, 150]]},
    "a click and a negative": {"points": [[200, 150], [300, 300]], "labels": [1, 0]},
    "a box": {"boxes": [[40, 30, 300, 280]]},
    "two boxes and a click": {"boxes": [[40, 30, 300, 280], [100, 100, 400, 500]], "points": [[200, 150]]},
    "one mask": {"points": [[200, 150]], "multimask": False},
    "a mask prompt": {"mask_input": logits_payload(MASK)},
    "a mask prompt and a click": {"mask_input": logits_payload(MASK), "points": [[100, 50]]},
}

CPU = torch.device("cpu")


def prepared(name: str, checkpoint) -> Sam3Net:
    """The net as the service serves it (float32): our faster trunk over the checkpoint's weights,
    which transformers' own modules, the reference, keep reading."""
    return prepare(build(model_type(name), str(checkpoint)), CPU, resolve_precision("float32", CPU))


@pytest.fixture(scope="module")
def test_net(random_sam3_checkpoint):
    return prepared("test_sam3", random_sam3_checkpoint)


def agree(reference: list[dict], ours: list[dict]) -> None:
    """Each concept's instances equal one to one: the same count, mask IoU >= 0.99, score within 1e-3."""
    assert sorted(r["concept"] for r in ours) == sorted(r["concept"] for r in reference)
    for concept in {r["concept"] for r in reference}:
        pairs = match_instances(
            [r for r in reference if r["concept"] == concept], [r for r in ours if r["concept"] == concept]
        )
        assert min(iou for iou, _ in pairs) >= 0.99, concept
        assert max(score for _, score in pairs) <= 1e-3, concept


@pytest.mark.parametrize("request_name", REQUESTS)
@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])
def test_concepts_match_transformers_one_to_one(request, test_net, request_name, photo):
    image = request.getfixturevalue(photo)
    concepts = parse_concepts({**REQUESTS[request_name], **KEEP_ALL}, image.shape[:2])
    predictor = Sam3Predictor(test_net, torch.float32)
    predictor.set_image(image)
    ours = predictor.segment_concepts(concepts, MAX_MASKS)
    reference = reference_concepts(test_net, image, concepts)
    assert len(reference) == 20 * len(concepts.texts)
    agree(reference, ours)
    if request_name == "exemplars":
        assert {r["concept"] for r in ours} == {EXEMPLAR_CONCEPT}


def same_masks(reference: tuple[torch.Tensor, ...], ours: tuple[torch.Tensor, ...]) -> None:
    """Prompt answers equal: every mask at IoU >= 0.99, predicted IoUs within 1e-3, the low-res
    logits (clamped as answers carry them) within 1e-3."""
    (their_masks, their_iou, their_logits), (masks, iou, logits) = reference, ours
    assert masks.shape == their_masks.shape and masks.any()
    inter = (masks & their_masks).flatten(2).sum(-1)
    union = (masks | their_masks).flatten(2).sum(-1)
    assert (inter / union.clamp(min=1)).min() >= 0.99
    assert (iou - their_iou).abs().max() <= 1e-3
    assert (logits - their_logits.clamp(-32, 32)).abs().max() <= 1e-3


@pytest.fixture(scope="module")
def test_reference_tracker(test_net):
    return reference_tracker(test_net)


@pytest.mark.parametrize("prompt_name", PROMPTS)
def test_prompts_match_transformers_tracker(test_net, test_reference_tracker, astronaut, prompt_name):
    prompts = parse_prompts(PROMPTS[prompt_name], astronaut.shape[:2], LOW_RES)
    predictor = Sam3Predictor(test_net, torch.float32)
    predictor.set_image(astronaut)
    ours = predictor.predict_prompts(prompts)
    assert ours[0].shape[:2] == (prompts.count, 3 if prompts.multimask else 1)
    same_masks(reference_prompts(test_net, test_reference_tracker, astronaut, prompts), ours)


def test_full_size_sam3_matches_transformers(tmp_path, astronaut):
    checkpoint = save_random_checkpoint(tmp_path / "sam3", "sam3", seed=0)
    net = prepared("sam3", checkpoint)
    concepts = parse_concepts({"text": "person", **KEEP_ALL}, astronaut.shape[:2])
    predictor = Sam3Predictor(net, torch.float32)
    predictor.set_image(astronaut)
    ours = predictor.segment_concepts(concepts, MAX_MASKS)
    reference = reference_concepts(net, astronaut, concepts)
    assert len(reference) == 200
    agree(reference, ours)
    prompts = parse_prompts(
        {"points": [[200, 150], [260, 90]], "labels": [1, 0], "boxes": [[40, 30, 300, 280]]},
        astronaut.shape[:2],
        model_type("sam3").mask_input_side,
    )
    same_masks(reference_prompts(net, reference_tracker(net), astronaut, prompts), predictor.predict_prompts(prompts))


def test_thresholds_and_the_cap_pick_the_best_instances(test_net, chelsea):
    predictor = Sam3Predictor(test_net, torch.float32)
    predictor.set_image(chelsea)
    every = predictor.segment_concepts(parse_concepts({"text": "cat", **KEEP_ALL}), MAX_MASKS)
    scores = sorted((r["score"] for r in every), reverse=True)
    middle = (scores[4] + scores[5]) / 2
    kept = predictor.segment_concepts(parse_concepts({"text": "cat", "threshold": middle}), MAX_MASKS)
    assert [r["score"] for r in kept] == scores[:5]
    capped = predictor.segment_concepts(parse_concepts({"text": "cat", **KEEP_ALL, "max_instances": 3}), MAX_MASKS)
    assert [r["score"] for r in capped] == scores[:3]
    tighter = predictor.segment_concepts(parse_concepts({"text": "cat", **KEEP_ALL, "mask_threshold": 0.9}), MAX_MASKS)
    assert sum(r["area"] for r in tighter) < sum(r["area"] for r in every)


@pytest.fixture(scope="module")
def sam3_service(random_sam3_checkpoint, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("sam3_model")
    (model_dir / random_sam3_checkpoint.name).symlink_to(random_sam3_checkpoint)
    return MaskService.load({"model_type": "test_sam3", "sam_checkpoint": random_sam3_checkpoint.name}, model_dir, None)


def ask(service: MaskService, document: dict, accept: str = "application/json"):
    return service.handle([({"body": document}, {"Accept": accept})])[0]


def test_one_request_many_concepts_then_more_by_image_id_without_the_vision_pass(sam3_service, test_net, chelsea):
    image = {"image": base64.b64encode(encode(chelsea)).decode()}
    calls = sam3_service.engine.predictor.encoder_calls
    both = ask(sam3_service, {**image, "text": ["cat", "dog"], **KEEP_ALL})
    assert both.status == 200 and sam3_service.engine.predictor.encoder_calls == calls + 1
    records = json.loads(both.body)
    assert [r["concept"] for r in records] == ["cat"] * 20 + ["dog"] * 20
    assert set(records[0]) == {"segmentation", "area", "bbox", "score", "concept"}
    image_id = both.headers["X-Image-Id"]
    alone = ask(sam3_service, {"image_id": image_id, "text": "dog", **KEEP_ALL})
    assert alone.status == 200 and sam3_service.engine.predictor.encoder_calls == calls + 1
    # A concept answered alone is the one answered beside another.
    agree([r for r in records if r["concept"] == "dog"], json.loads(alone.body))
    pickled = sam3_service.handle([({"body": bytearray(encode(chelsea)), "text": "cat"}, {})])[0]
    assert pickled.status == 200 and isinstance(decode_pickled(pickled.body), list)


def test_a_label_png_numbers_the_instances_in_answer_order(sam3_service, chelsea):
    image = base64.b64encode(encode(chelsea)).decode()
    records = json.loads(
        ask(sam3_service, {"image": image, "text": ["cat", "dog"], "max_instances": 2, **KEEP_ALL}).body
    )
    picture = ask(sam3_service, {"image": image, "text": ["cat", "dog"], "max_instances": 2, **KEEP_ALL}, "image/png")
    labels = np.asarray(Image.open(io.BytesIO(picture.body)))
    assert picture.status == 200 and labels.shape == chelsea.shape[:2] and labels.dtype == np.uint16
    assert len(records) == 4 and set(np.unique(labels)) <= {0, 1, 2, 3, 4} and labels.max() >= 1
    by_id = ask(sam3_service, {"image_id": picture.headers["X-Image-Id"], "text": "cat", **KEEP_ALL}, "image/png")
    assert by_id.status == 200 and np.asarray(Image.open(io.BytesIO(by_id.body))).shape == chelsea.shape[:2]


@pytest.mark.parametrize(
    ("document", "status", "words"),
    [
        ({"text": ""}, 422, "empty phrase"),
        ({"text": 7}, 422, "'text' must be a phrase"),
        ({"text": ["a"] * 17}, 422, "at most 16 concepts"),
        ({"text": "x" * 40}, 422, "at most 32"),
        ({"text": "cat", "threshold": 2}, 422, "'threshold' must be a number from 0 to 1"),
        ({"text": "cat", "max_instances": 0}, 422, "'max_instances'"),
        ({"exemplar_boxes": [[10, 10, 5, 5]]}, 422, "x0 < x1"),
        ({"exemplar_boxes": [[0, 0, 9000, 10]]}, 422, "inside the 451x300 image"),
        ({"exemplar_boxes": [[0, 0, 9, 10]], "exemplar_labels": [2]}, 422, "'exemplar_labels'"),
        ({"exemplar_labels": [1]}, 422, "given without 'text' or 'exemplar_boxes'"),
        ({"text": "cat", "points_per_side": 4}, 422, "do not apply to a concept request"),
        ({"points": [[10, 10]], "text": "cat"}, 422, "'points' do not apply to a concept request"),
        ({"points": [[10, 10]], "mask_input": logits_payload(np.zeros((256, 256), np.float32))}, 422, "[1, 96, 96]"),
        ({}, 400, "has no automatic mask generation: give 'text' or 'exemplar_boxes' or points, boxes or a mask_input"),
    ],
)
def test_bad_concept_requests_are_refused_with_the_reason(sam3_service, chelsea, document, status, words):
    image = base64.b64encode(encode(chelsea)).decode()
    reply = ask(sam3_service, {"image": image, **document})
    assert reply.status == status and words in json.loads(reply.body)["message"], reply.body
    assert ask(sam3_service, {"image": image, "text": "cat"}).status == 200  # the worker goes on


def test_an_exemplar_outside_a_cached_image_is_refused(sam3_service, chelsea):
    image = base64.b64encode(encode(chelsea)).decode()
    image_id = ask(sam3_service, {"image": image, "text": "cat"}).headers["X-Image-Id"]
    reply = ask(sam3_service, {"image_id": image_id, "exemplar_boxes": [[0, 0, 9000, 10]]})
    assert reply.status == 422 and "inside the 451x300 image" in json.loads(reply.body)["message"]


def test_other_families_refuse_concepts_naming_sam3(random_checkpoint, tmp_path, chelsea):
    (tmp_path / random_checkpoint.name).symlink_to(random_checkpoint)
    service = MaskService.load({"model_type": "test_vit", "sam_checkpoint": random_checkpoint.name}, tmp_path, None)
    image = base64.b64encode(encode(chelsea)).decode()
    reply = ask(service, {"image": image, "text": "cat"})
    assert reply.status == 400 and "SAM 3 (model_type sam3" in json.loads(reply.body)["message"]


def test_a_checkpoint_folder_missing_files_is_named(random_sam3_checkpoint, tmp_path):
    partial = tmp_path / "sam3"
    partial.mkdir()
    (partial / "config.json").write_bytes((random_sam3_checkpoint / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="lacks model.safetensors, processor_config.json"):
        build(model_type("test_sam3"), str(partial))
    with pytest.raises(ConfigError, match=r"'sam3' not found in .* \(sam3's checkpoint is a folder\)"):
        MaskService.load({"model_type": "sam3"}, tmp_path / "empty", None)


def test_the_masks_of_a_request_are_capped_across_concepts_by_score(test_net, chelsea):
    predictor = Sam3Predictor(test_net, torch.float32)
    predictor.set_image(chelsea)
    concepts = parse_concepts({"text": ["cat", "dog", "fur"], **KEEP_ALL})
    every = predictor.segment_concepts(concepts, MAX_MASKS)
    capped = predictor.segment_concepts(concepts, 7)
    best = sorted(every, key=lambda r: -r["score"])[:7]
    assert len(capped) == 7 and sorted(r["score"] for r in capped) == sorted(r["score"] for r in best)
    # Still each concept's best first, the concepts in the request's order.
    assert [r["concept"] for r in capped] == sorted((r["concept"] for r in capped), key=concepts.texts.index)


def test_phrases_past_the_text_cache_are_encoded_again_and_answered(test_net, chelsea, monkeypatch):
    monkeypatch.setattr("sam_fast_serve.models.sam3.predictor.TEXT_CACHE", 1)
    predictor = Sam3Predictor(test_net, torch.float32)
    predictor.set_image(chelsea)
    first = predictor.segment_concepts(parse_concepts({"text": "cat", **KEEP_ALL}), MAX_MASKS)
    predictor.segment_concepts(parse_concepts({"text": "dog", **KEEP_ALL}), MAX_MASKS)
    both = predictor.segment_concepts(parse_concepts({"text": ["cat", "fur"], **KEEP_ALL}), MAX_MASKS)
    assert [r["score"] for r in both if r["concept"] == "cat"] == [r["score"] for r in first]
    assert list(predictor.texts) == ["cat", "fur"]


def test_an_image_one_or_three_pixels_tall_is_read_channels_last(test_net):
    strip = np.random.default_rng(0).integers(0, 256, (3, 40, 3), dtype=np.uint8)
    predictor = Sam3Predictor(test_net, torch.float32)
    predictor.set_image(strip)
    records = predictor.segment_concepts(parse_concepts({"text": "line", **KEEP_ALL}), MAX_MASKS)
    assert records and records[0]["segmentation"]["size"] == [3, 40]


def test_prompts_by_image_id_after_a_concept_reuse_its_vision_pass(sam3_service, chelsea):
    image = {"image": base64.b64encode(encode(chelsea)).decode()}
    found = ask(sam3_service, {**image, "text": "cat", **KEEP_ALL})
    calls = sam3_service.engine.predictor.encoder_calls
    clicked = ask(
        sam3_service, {"image_id": found.headers["X-Image-Id"], "points": [[200, 150]], "return_logits": True}
    )
    assert clicked.status == 200 and sam3_service.engine.predictor.encoder_calls == calls, clicked.body
    (answer,) = json.loads(clicked.body)["prompts"]
    assert len(answer["masks"]) == 3 and answer["low_res_logits"]["shape"] == [3, LOW_RES, LOW_RES]
    assert answer["masks"][0]["segmentation"]["size"] == [300, 451]
    # An answer's low-res logits are a mask prompt of the right side.
    logits = np.frombuffer(base64.b64decode(answer["low_res_logits"]["data"]), "<f4").reshape(3, LOW_RES, LOW_RES)
    again = {"shape": [1, LOW_RES, LOW_RES], "dtype": "float32", "data": base64.b64encode(logits[0].tobytes()).decode()}
    refined = ask(
        sam3_service, {"image_id": found.headers["X-Image-Id"], "mask_input": again, "boxes": [[40, 30, 300, 280]]}
    )
    assert refined.status == 200 and len(json.loads(refined.body)["prompts"][0]["masks"]) == 1


def test_a_detector_alone_answers_concepts_and_refuses_prompts_saying_why(test_net, tmp_path, chelsea):
    save_checkpoint(Sam3Net(test_net.model, test_net.processor), tmp_path / "detector")
    assert json.loads((tmp_path / "detector" / "config.json").read_text())["model_type"] == "sam3"
    service = MaskService.load({"model_type": "test_sam3", "sam_checkpoint": "detector"}, tmp_path, None)
    image = base64.b64encode(encode(chelsea)).decode()
    calls = service.engine.predictor.encoder_calls
    reply = ask(service, {"image": image, "points": [[10, 10]]})
    assert reply.status == 400 and "no tracker weights" in json.loads(reply.body)["message"], reply.body
    assert service.engine.predictor.encoder_calls == calls  # refused before the vision pass
    assert ask(service, {"image": image, "text": "cat"}).status == 200
