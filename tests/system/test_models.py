"""Several models side by side in one TorchServe: a fast and an accurate configuration of one SAM 1
checkpoint and a SAM 2.1 model, each its own archive, config, URL, workers and metrics; the
embedding store shares what is interchangeable (one checkpoint in one dtype) and nothing else."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import RedisServer, TorchServe

# Two configurations of SAM 1 (a 4x4 grid and a 2x2 one, both fp32: bf16 is emulated on CPUs
# without it, and the dtype's part in a store key is test_store's) and SAM 2.1 on 3x3, by the
# checkpoint fixture each serves.
MODELS = {
    "sam-fast": ("random_checkpoint", {"dtype": "float32", "points_per_side": 4}),
    "sam-accurate": ("random_checkpoint", {"dtype": "float32", "points_per_side": 2}),
    "sam2": ("random_sam2_checkpoint", {"points_per_side": 3}),
}
GRIDS = {"sam-fast": 4 * 4 * 3, "sam-accurate": 2 * 2 * 3, "sam2": 3 * 3 * 3}


@contextlib.contextmanager
def served_with_a_store(
    request: pytest.FixtureRequest, tmp_path: Path, models: dict[str, tuple[str, dict]]
) -> Iterator[tuple[TorchServe, redis.Redis]]:
    """One TorchServe serving each of `models` (name -> (its checkpoint fixture, handler keys)),
    all sharing one Redis embedding store; both stopped in every case."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    try:
        archives = {
            name: smoke_archive(
                tmp_path,
                request.getfixturevalue(checkpoint),
                name,
                handler={**handler, "embedding_store": redis_server.url},
            )
            for name, (checkpoint, handler) in models.items()
        }
        (tmp_path / "torchserve").mkdir()
        server = TorchServe(tmp_path / "torchserve", tmp_path / "model_store", {n: a.name for n, a in archives.items()})
        server.start()
        try:
            yield server, redis.Redis.from_url(redis_server.url)
        finally:
            server.stop()
    finally:
        redis_server.stop()


def test_models_of_both_families_each_with_its_own_config_url_and_store_keys(request, tmp_path, chelsea):
    with served_with_a_store(request, tmp_path, MODELS) as (server, store):
        check_side_by_side(server, store, chelsea)


def check_side_by_side(server: TorchServe, store: redis.Redis, chelsea: np.ndarray) -> None:
    def ask(model: str, body: bytes | dict) -> requests.Response:
        headers = {**server.auth(), "Accept": "application/json"}
        if isinstance(body, dict):
            return requests.post(f"{server.inference_url}/predictions/{model}", json=body, headers=headers, timeout=300)
        headers["Content-Type"] = "application/octet-stream"
        return requests.post(f"{server.inference_url}/predictions/{model}", data=body, headers=headers, timeout=300)

    png = encode(chelsea)
    masks = {model: len(ask(model, png).json()) for model in MODELS}
    assert masks == GRIDS  # each its own grid
    keys = [key.decode() for key in store.keys("sam-fast:emb:*")]
    prefixes = {key.rsplit(":", 1)[0] for key in keys}
    assert len(keys) == 2 and len(prefixes) == 2  # one image; the two SAM 1 configurations share one identity
    # An image only the fast model has seen: the accurate one reads its embedding (same weights, same
    # dtype), the other family does not, whatever the shared store holds.
    flipped = ask("sam-fast", encode(np.ascontiguousarray(chelsea[::-1])))
    image_id = flipped.headers["X-Image-Id"]
    prompt = {"image_id": image_id, "points": [[100.0, 100.0]]}
    assert ask("sam-fast", prompt).status_code == 200
    shared = ask("sam-accurate", prompt)
    assert shared.status_code == 200 and shared.json() == ask("sam-fast", prompt).json()
    unknown = ask("sam2", prompt)
    assert unknown.status_code == 404 and "not in the embedding store" in unknown.json()["message"]
    # An option of one family only is refused by the other, naming it.
    refused = ask("sam-fast", {"image": base64.b64encode(png).decode(), "use_m2m": True})
    assert refused.status_code == 422 and "'use_m2m'" in refused.json()["message"]
    assert ask("sam2", {"image": base64.b64encode(png).decode(), "use_m2m": True}).status_code == 200
    # Each model has its own workers and its own metrics.
    for model, count in {"sam-fast": 4, "sam-accurate": 2, "sam2": 2}.items():
        assert server.metric("sam_answers_total", ModelName=model, status="200") == count, model


def test_sam3_beside_sam2_in_one_torchserve_each_refusing_the_others_requests(request, tmp_path, chelsea):
    """SAM 3 (concepts, prompts) and SAM 2.1 (automatic, prompts) side by side, sharing one Redis
    store: each answers its own kind of request and refuses the other's naming the model types that
    take it, and their store entries never mix."""
    models = {"sam2": ("random_sam2_checkpoint", {}), "sam3": ("random_sam3_checkpoint", {})}
    with served_with_a_store(request, tmp_path, models) as (server, store):
        check_sam3_beside_sam2(server, store, chelsea)


def check_sam3_beside_sam2(server: TorchServe, store: redis.Redis, chelsea: np.ndarray) -> None:
    def ask(model: str, document: dict) -> requests.Response:
        headers = {**server.auth(), "Accept": "application/json"}
        return requests.post(f"{server.inference_url}/predictions/{model}", json=document, headers=headers, timeout=300)

    image = base64.b64encode(encode(chelsea)).decode()
    found = ask("sam3", {"image": image, "text": ["cat", "dog"], "threshold": 0.0, "max_instances": 3})
    assert found.status_code == 200, found.text
    assert [record["concept"] for record in found.json()] == ["cat"] * 3 + ["dog"] * 3
    image_id = found.headers["X-Image-Id"]
    again = ask("sam3", {"image_id": image_id, "text": "cat", "threshold": 0.0, "max_instances": 3})
    assert again.status_code == 200 and [r["score"] for r in again.json()] == [r["score"] for r in found.json()[:3]]
    assert len(ask("sam2", {"image": image}).json()) == 4 * 4 * 3  # the smoke grid, every mask kept
    prefixes = {key.decode().rsplit(":", 1)[0] for key in store.keys("sam-fast:emb:*")}
    assert len(prefixes) == 2  # one identity per model, one image each
    refused = ask("sam2", {"image": image, "text": "cat"})
    assert refused.status_code == 400 and "SAM 3 (model_type sam3" in refused.json()["message"]
    refused = ask("sam3", {"image": image})
    assert refused.status_code == 400 and "sam2.1_hiera_tiny" in refused.json()["message"]
    # A click on the image SAM 3 found concepts in: its tracker's part came with that vision pass.
    (clicked,) = ask("sam3", {"image_id": image_id, "points": [[10, 10]]}).json()["prompts"]
    assert len(clicked["masks"]) == 3
    # An image only SAM 3 has seen: its id means nothing to SAM 2.1, whatever the shared store holds.
    flipped = base64.b64encode(encode(np.ascontiguousarray(chelsea[::-1]))).decode()
    only = ask("sam3", {"image": flipped, "text": "cat"}).headers["X-Image-Id"]
    unknown = ask("sam2", {"image_id": only, "points": [[10.0, 10.0]]})
    assert unknown.status_code == 404
    assert server.metric("sam_answers_total", ModelName="sam3", status="200") == 4
    assert server.metric("sam_answers_total", ModelName="sam3", status="400") == 1
