"""Prompted masks and the embedding cache.

Equivalence: the service (fp32, random-weight vit_b) against segment_anything.SamPredictor on the
same photo, for single points, mixed positive/negative points, one box, several boxes, and a box
with points: masks at IoU >= 0.99, scores within 1e-3.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from harness.files import encode
from harness.prompts import CASES, reference_answer
from sam_fast_serve.common.prompts import logits_payload
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.models.embedding import EmbeddingCache, ImageEmbedding, pixel_key


def ask(service, document: dict, json_reply: bool = False):
    headers = {"Accept": "application/json"} if json_reply else {}
    reply = service.handle([({"body": document}, headers)])[0]
    return reply, (
        json.loads(reply.body) if json_reply else decode_pickled(reply.body)
    ) if reply.status == 200 else None


@pytest.mark.parametrize("case", list(CASES))
def test_prompts_match_sam_predictor(fp32_service, reference_predictor, astronaut, case):
    document = {"image": base64.b64encode(encode(astronaut)).decode(), **CASES[case]}
    reply, answer = ask(fp32_service, document)
    assert reply.status == 200, reply.body
    multimask = case == "single point"  # the documented default
    ref_masks, ref_scores = reference_answer(reference_predictor, CASES[case], multimask)
    assert len(answer["prompts"]) == ref_masks.shape[0]
    for prompt, ref_prompt_masks, ref_prompt_scores in zip(answer["prompts"], ref_masks, ref_scores):
        assert len(prompt["masks"]) == ref_prompt_masks.shape[0] == (3 if multimask else 1)
        for mask, ref_mask, ref_score in zip(prompt["masks"], ref_prompt_masks, ref_prompt_scores):
            ours = mask_utils.decode(mask["segmentation"]).astype(bool)
            union = (ours | ref_mask).sum()
            assert union == 0 or (ours & ref_mask).sum() / union >= 0.99
            assert abs(mask["predicted_iou"] - float(ref_score)) < 1e-3
            assert mask["area"] == int(ours.sum())


MASK = logits_payload(np.zeros((1, 256, 256), dtype=np.float32))


def test_a_mask_prompt_from_an_answer_matches_sam_predictor(fp32_service, reference_predictor, astronaut):
    # The loop annotation tools run: a click, then the chosen mask's logits back with a second click.
    image = base64.b64encode(encode(astronaut)).decode()
    reply, first = ask(fp32_service, {"image": image, "points": [[200.0, 150.0]], "return_logits": True}, True)
    logits = first["prompts"][0]["low_res_logits"]
    best = np.frombuffer(base64.b64decode(logits["data"]), dtype="<f4").reshape(logits["shape"])[:1]
    points, labels = [[200.0, 150.0], [320.0, 400.0]], [1, 0]
    document = {"image_id": first["image_id"], "points": points, "labels": labels, "mask_input": logits_payload(best)}
    reply, answer = ask(fp32_service, document)
    assert reply.status == 200, reply.body
    ref_masks, ref_scores, _ = reference_predictor.predict(
        np.array(points), np.array(labels), mask_input=best, multimask_output=False
    )
    ours = mask_utils.decode(answer["prompts"][0]["masks"][0]["segmentation"]).astype(bool)
    assert (ours & ref_masks[0]).sum() / max(1, (ours | ref_masks[0]).sum()) >= 0.99
    assert abs(answer["prompts"][0]["masks"][0]["predicted_iou"] - float(ref_scores[0])) < 1e-3
    # The mask prompt changes the answer: without it the same points give another mask.
    reply, plain = ask(fp32_service, {"image_id": first["image_id"], "points": points, "labels": labels})
    assert plain["prompts"][0]["masks"][0]["segmentation"] != answer["prompts"][0]["masks"][0]["segmentation"]


def test_cached_prompts_skip_the_encoder_and_image_id_works(fp32_service, chelsea):
    service = fp32_service
    png = encode(chelsea)
    calls = service.engine.predictor.encoder_calls
    first, answer = ask(service, {"image": base64.b64encode(png).decode(), "points": [[100, 100]]}, json_reply=True)
    assert first.status == 200 and service.engine.predictor.encoder_calls == calls + 1
    image_id = answer["image_id"]
    assert image_id == first.headers["X-Image-Id"] == pixel_key(chelsea)
    # The same pixels in another file format are the same image; image_id alone works too.
    again, same = ask(
        service, {"image": base64.b64encode(encode(chelsea, "BMP")).decode(), "points": [[100, 100]]}, True
    )
    by_id, by_id_answer = ask(service, {"image_id": image_id, "points": [[100, 100]]}, json_reply=True)
    assert service.engine.predictor.encoder_calls == calls + 1
    assert same == by_id_answer == answer
    # Logits only when asked for: (masks, 256, 256) float32.
    _, with_logits = ask(service, {"image_id": image_id, "boxes": [[10, 10, 200, 200]], "return_logits": True})
    logits = with_logits["prompts"][0]["low_res_logits"]
    assert logits["shape"] == [1, 256, 256] and len(base64.b64decode(logits["data"])) == 4 * 256 * 256
    assert "low_res_logits" not in answer["prompts"][0]


def test_different_images_never_share_an_entry(fp32_service, chelsea):
    changed = chelsea.copy()
    changed[0, 0, 0] ^= 1  # one bit of one pixel
    assert pixel_key(changed) != pixel_key(chelsea)
    assert pixel_key(np.ascontiguousarray(chelsea.transpose(1, 0, 2))) != pixel_key(chelsea)
    calls = fp32_service.engine.predictor.encoder_calls
    reply, answer = ask(fp32_service, {"image": base64.b64encode(encode(changed)).decode(), "points": [[100, 100]]})
    assert fp32_service.engine.predictor.encoder_calls == calls + 1 and answer["image_id"] == pixel_key(changed)


def test_cache_eviction_respects_the_byte_bound():
    def embedding(value: float) -> ImageEmbedding:
        return ImageEmbedding({"features": torch.full((1, 256, 64, 64), float(value))}, (1024, 1024), (512, 512))

    size = embedding(0).nbytes
    cache = EmbeddingCache(capacity_bytes=2 * size + size // 2)
    for key in "abc":
        cache.put(key, embedding(ord(key)))
        assert cache.size_bytes <= cache.capacity_bytes
    assert cache.get("a") is None and len(cache) == 2  # least recently used went first
    assert cache.get("b") is not None  # b is now the most recent
    cache.put("d", embedding(1.0))
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    off = EmbeddingCache(0)
    off.put("a", embedding(0))
    assert off.get("a") is None and off.size_bytes == 0


@pytest.mark.parametrize(
    "fields, status, mentions",
    [
        ({"points": [[600, 10]]}, 422, "'points'"),
        ({"points": [[-1, 10]]}, 422, "'points'"),
        ({"points": [[10, 10]], "labels": [1, 0]}, 422, "'labels'"),
        ({"points": [[10, 10]], "labels": [2]}, 422, "'labels'"),
        ({"points": [[10, 10], [20]]}, 422, "'points'"),
        ({"points": [[10, 10]] * 65}, 422, "at most 64"),
        ({"boxes": [[50, 50, 40, 80]]}, 422, "'boxes'"),
        ({"boxes": [[50, 50, 50, 80]]}, 422, "'boxes'"),
        ({"boxes": [[0, 0, 700, 80]]}, 422, "'boxes'"),
        ({"boxes": [[0, 0, 10, 10]] * 65}, 422, "at most 64"),
        ({"points": [[10, 10]], "multimask": "yes"}, 422, "'multimask'"),
        ({"labels": [1]}, 422, "'labels'"),
        ({"points": [[10, 10]], "points_per_side": 4}, 422, "'points_per_side'"),
        ({"mask_input": [[0.0]]}, 422, "'mask_input'"),
        ({"mask_input": {**MASK, "shape": [3, 256, 256]}}, 422, "'mask_input'"),
        ({"mask_input": {**MASK, "data": "not base64!"}}, 422, "'mask_input'"),
        ({"mask_input": {**MASK, "data": MASK["data"][:-8]}}, 422, "'mask_input'"),
        ({"mask_input": {**MASK, "data": "A" * 400_000}}, 422, "'mask_input'"),
        ({"mask_input": logits_payload(np.full((256, 256), np.nan))}, 422, "'mask_input'"),
        ({"mask_input": MASK, "boxes": [[0, 0, 10, 10]] * 2}, 422, "'mask_input'"),
    ],
)
def test_bad_prompts_get_422_naming_the_field(fp32_service, astronaut, fields, status, mentions):
    calls = fp32_service.engine.predictor.encoder_calls
    reply, _ = ask(fp32_service, {"image": base64.b64encode(encode(astronaut)).decode(), **fields})
    assert reply.status == status, reply.body
    body = json.loads(reply.body)
    assert body["code"] == status and mentions in body["message"], body
    assert fp32_service.engine.predictor.encoder_calls == calls  # refused before the encoder ran


def test_unknown_or_evicted_image_id_is_404(fp32_service):
    reply, _ = ask(fp32_service, {"image_id": "0" * 32, "points": [[1, 1]]})
    assert reply.status == 404 and "send the image again" in json.loads(reply.body)["message"]


@pytest.mark.parametrize("image_id", ["", "0" * 31, "0" * 33, "G" * 32, "A" * 32, "*", "x" * 100_000, 7, None])
def test_malformed_image_id_is_400(fp32_service, image_id):
    reply, _ = ask(fp32_service, {"image_id": image_id, "points": [[1, 1]]})
    assert reply.status == 400 and "'image_id'" in json.loads(reply.body)["message"]
