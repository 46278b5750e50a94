"""Two TorchServe workers and prompts by image_id: with a shared Redis store every prompt is
answered whichever worker takes it; with the per-worker `memory` store, the prompts that land on
the worker that did not encode the image answer 404. Real TorchServe, real Redis, on loopback."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness.archives import running_server
from harness.files import encode
from harness.servers import RedisServer
from sam_fast_serve.server.runtime import cpu_budget

CLICKS = [[[30.0 + 25 * i, 40.0 + 15 * i]] for i in range(16)]
TWO_WORKERS = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 1}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def prompt_round(server, png: bytes) -> tuple[list[int], list[dict], list[dict], set[int]]:
    """Send the image once, then the 16 clicks by image_id from 4 concurrent clients, then each
    click again with the image itself (always answerable). Returns the statuses and JSON answers by
    id, the direct answers, and the worker pids that served."""
    url = f"{server.inference_url}/predictions/sam-fast"
    headers = {**server.auth(), "Accept": "application/json"}
    first = requests.post(url, data=png, headers={**headers, "Content-Type": "application/octet-stream"}, timeout=300)
    assert first.status_code == 200, first.text[:300]
    image_id = first.headers["X-Image-Id"]

    def ask(document: dict) -> requests.Response:
        return requests.post(url, json=document, headers=headers, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        by_id = list(pool.map(lambda click: ask({"image_id": image_id, "points": click}), CLICKS))
    image = base64.b64encode(png).decode()
    direct = [ask({"image": image, "points": click}) for click in CLICKS]
    assert all(reply.status_code == 200 for reply in direct)
    pids = {int(w["pid"]) for w in requests.get(f"{server.management_url}/models/sam-fast",
                                                headers=server.auth("management"), timeout=10).json()[0]["workers"]}  # fmt: skip
    return [r.status_code for r in by_id], [r.json() for r in by_id], [r.json() for r in direct], pids


def test_two_workers_answer_every_prompt_from_the_shared_store(
    tmp_path_factory, random_checkpoint, redis_server, chelsea
):
    overrides = {**TWO_WORKERS, "handler": {"embedding_store": redis_server.url}}
    with running_server(tmp_path_factory.mktemp("two-workers-redis"), random_checkpoint, **overrides) as server:
        statuses, by_id, direct, pids = prompt_round(server, encode(chelsea))
    assert len(pids) == 2
    assert statuses == [200] * len(CLICKS), [answer.get("message") for answer in by_id]
    assert by_id == direct
    # Each worker takes its share of the cores, not all of them.
    threads = max(1, cpu_budget() // 2)
    assert server.model_log().count(f"torch threads: {threads} ({cpu_budget()} cores for 2 worker(s))") == 2
    assert len({json.dumps(answer) for answer in direct}) == len(CLICKS)  # distinct clicks, distinct masks


def test_two_workers_with_the_memory_store_lose_prompts(tmp_path_factory, random_checkpoint, chelsea):
    with running_server(tmp_path_factory.mktemp("two-workers-memory"), random_checkpoint, **TWO_WORKERS) as server:
        statuses, by_id, direct, _ = prompt_round(server, encode(chelsea[::-1]))
    lost = [answer for status, answer in zip(statuses, by_id) if status != 200]
    assert lost and all(answer["code"] == 404 and "send the image again" in answer["message"] for answer in lost)
    assert all(answer == expected for status, answer, expected in zip(statuses, by_id, direct) if status == 200)
    print(f"memory store, 2 workers: {len(lost)} of {len(CLICKS)} prompts by image_id answered 404")
