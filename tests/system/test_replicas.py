"""Replicas behind a real load balancer: two TorchServes (their own ports, keys and workers) behind
Debian's nginx running the shipped deploy/nginx/balancer.conf, sharing one Redis embedding store.
Prompts by image_id are answered whichever replica takes them, and killing a replica in the middle
of a client run over a folder loses no image and duplicates none."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import REPO, Balancer, RedisServer, TorchServe

MODEL_URL = "/predictions/sam-fast"
TOKEN = secrets.token_urlsafe(24)
CLICKS = [[[30.0 + 25 * i, 40.0 + 15 * i]] for i in range(8)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, random_checkpoint):
    """Two TorchServes of one archive (shared Redis store) behind the balancer."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    work = tmp_path_factory.mktemp("replicas")
    archive = smoke_archive(work, random_checkpoint, handler={"embedding_store": redis_server.url})
    servers = []
    for n in (1, 2):
        (work / f"replica-{n}").mkdir()
        servers.append(TorchServe(work / f"replica-{n}", archive.parent, archive.name))
    (work / "balancer").mkdir()
    balancer = Balancer(work / "balancer", servers, TOKEN)
    try:
        for server in servers:
            server.start()
        balancer.start()
        yield servers, balancer
    finally:
        balancer.stop()
        for server in servers:
            server.stop()
        redis_server.stop()


def answered(server: TorchServe) -> int:
    """The 200 answers `server`'s handler has given (its Prometheus metrics)."""
    return int(server.metric("sam_answers_total", status="200") or 0)


def test_balancer_refuses_requests_without_its_token(replicas, chelsea):
    _, balancer = replicas
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}):
        reply = requests.post(balancer.url + MODEL_URL, data=encode(chelsea), headers=headers, timeout=60)
        assert reply.status_code == 401 and "token" in reply.json()["message"]


def test_prompts_through_the_balancer_come_from_the_shared_store(replicas, chelsea):
    (first, second), balancer = replicas
    png = encode(chelsea)
    reply = requests.post(
        first.inference_url + MODEL_URL,
        data=png,
        headers={**first.auth(), "Content-Type": "application/octet-stream"},
        timeout=300,
    )
    assert reply.status_code == 200
    image_id = reply.headers["X-Image-Id"]
    before = answered(second)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}

    def ask(document: dict) -> requests.Response:
        return requests.post(balancer.url + MODEL_URL, json=document, headers=headers, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        by_id = list(pool.map(lambda click: ask({"image_id": image_id, "points": click}), CLICKS))
    assert [r.status_code for r in by_id] == [200] * len(CLICKS), [r.text[:200] for r in by_id]
    image = base64.b64encode(png).decode()
    direct = [ask({"image": image, "points": click}).json() for click in CLICKS]
    assert [r.json() for r in by_id] == direct
    # Round robin: the replica that never saw the image answered some of the prompts by id.
    assert answered(second) - before >= len(CLICKS) // 2


def test_a_replica_killed_mid_run_loses_no_image_and_duplicates_none(replicas, tmp_path, astronaut):
    (first, second), balancer = replicas
    folder = tmp_path / "images"
    folder.mkdir()
    names = []
    for i in range(12):
        crop = np.ascontiguousarray(np.roll(astronaut, 17 * i, axis=1)[: 200 + 8 * i, : 240 + 4 * i])
        names.append(f"image-{i:02d}")
        (folder / f"{names[-1]}.png").write_bytes(encode(crop))
    out, coco = tmp_path / "out", tmp_path / "coco.json"
    command = [sys.executable, str(REPO / "inference.py"), str(folder), "--url", balancer.url, f"--token={TOKEN}",
               "--out", str(out), "--coco", str(coco), "--concurrency", "4", "--no-overlay"]  # fmt: skip
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("*.json"))) < 3 and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.2)
        assert first.process is not None
        os.killpg(first.process.pid, signal.SIGKILL)  # the frontend and its worker, as a crash would
        output, _ = client.communicate(timeout=600)
    finally:
        client.kill()
    assert client.returncode == 0, output
    assert "12 images: 12 segmented\n" in output, output
    assert sorted(p.stem for p in out.glob("*.json")) == names
    dataset = json.loads(coco.read_text())
    assert sorted(image["file_name"] for image in dataset["images"]) == [f"{name}.png" for name in names]
    per_image = {image["id"]: 0 for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        per_image[annotation["image_id"]] += 1
    assert set(per_image.values()) == {48}  # smoke config: 16 points x 3 masks, each image once
    # The balancer moved requests off the dead replica: an upstream answered 503 and the next one 200.
    retried = re.findall(r"upstream_status=(\S+, \S+)", balancer.log.read_text())
    assert any(statuses.endswith("200") for statuses in retried), balancer.log.read_text()[-2000:]
