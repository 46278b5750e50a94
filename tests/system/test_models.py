"""Several models side by side in one TorchServe: a fast and an accurate configuration of one
checkpoint, each its own archive, config, URL, workers, metrics and embedding-store keys."""

from __future__ import annotations

import numpy as np
import redis
import requests

from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import RedisServer, TorchServe

# Two configurations of the random vit_b: the fast one in bf16 on a 4x4 grid, the accurate one in fp32 on 2x2.
MODELS = {
    "sam-fast": {"dtype": "bfloat16", "points_per_side": 4},
    "sam-accurate": {"dtype": "float32", "points_per_side": 2},
}


def test_two_models_each_with_its_own_config_url_and_store_keys(tmp_path, random_checkpoint, chelsea):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    try:
        archives = {
            name: smoke_archive(
                tmp_path, random_checkpoint, name, handler={**handler, "embedding_store": redis_server.url}
            )
            for name, handler in MODELS.items()
        }
        (tmp_path / "torchserve").mkdir()
        server = TorchServe(tmp_path / "torchserve", tmp_path / "model_store", {n: a.name for n, a in archives.items()})
        server.start()
        try:
            check_side_by_side(server, redis.Redis.from_url(redis_server.url), chelsea)
        finally:
            server.stop()
    finally:
        redis_server.stop()


def check_side_by_side(server: TorchServe, store: redis.Redis, chelsea: np.ndarray) -> None:
    def ask(model: str, body: bytes | dict) -> requests.Response:
        headers = {**server.auth(), "Accept": "application/json"}
        if isinstance(body, dict):
            return requests.post(f"{server.inference_url}/predictions/{model}", json=body, headers=headers, timeout=300)
        headers["Content-Type"] = "application/octet-stream"
        return requests.post(f"{server.inference_url}/predictions/{model}", data=body, headers=headers, timeout=300)

    png = encode(chelsea)
    masks = {model: len(ask(model, png).json()) for model in MODELS}
    assert masks == {"sam-fast": 4 * 4 * 3, "sam-accurate": 2 * 2 * 3}  # each its own grid
    keys = [key.decode() for key in store.keys("sam-fast:emb:*")]
    prefixes = {key.rsplit(":", 1)[0] for key in keys}
    assert len(keys) == 2 and len(prefixes) == 2  # one image, two models, two identities
    # An image only the fast model has seen is unknown to the accurate one, whatever the shared store holds.
    flipped = ask("sam-fast", encode(np.ascontiguousarray(chelsea[::-1])))
    image_id = flipped.headers["X-Image-Id"]
    prompt = {"image_id": image_id, "points": [[100.0, 100.0]]}
    assert ask("sam-fast", prompt).status_code == 200
    unknown = ask("sam-accurate", prompt)
    assert unknown.status_code == 404 and "not in the embedding store" in unknown.json()["message"]
    # Each model has its own workers and its own metrics.
    for model, count in {"sam-fast": 3, "sam-accurate": 1}.items():
        assert server.metric("sam_answers_total", ModelName=model, status="200") == count, model
