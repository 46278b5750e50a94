"""Bad input, load and faults against a real TorchServe (batchSize 4): every bad request gets its
documented 4xx and JSON body, the worker survives, and no good request is lost or mixed up."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests

from harness.archives import client_command, running_server
from harness.files import encode, png_claiming
from sam_fast_serve.common.wire import decode_pickled

MAX_PIXELS = 600_000  # handler key max_image_pixels of this server
RESPONSE_LIMIT = 4 * 1024 * 1024  # handler key max_response_bytes: 4x4 points fit, 16x16 do not
MASKS_PER_IMAGE = 16 * 3


def bad_files(chelsea):
    """(name, file bytes, HTTP status, error kind) for every bad image we document."""
    jpeg, png = encode(chelsea, "JPEG"), encode(chelsea)
    corrupt = bytearray(jpeg)
    corrupt[20:200] = bytes(180)  # quantisation and Huffman tables gone
    return [
        ("empty", b"", 400, "bad_request"),
        ("text", b"hello, I am not an image at all", 415, "unsupported_media_type"),
        ("pdf", b"%PDF-1.7\n1 0 obj<<>>endobj\n", 415, "unsupported_media_type"),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], 400, "bad_request"),
        ("truncated png", png[: len(png) // 2], 400, "bad_request"),
        ("corrupt jpeg", bytes(corrupt), 400, "bad_request"),
        ("zero-sized png", png_claiming(0, 16), 400, "bad_request"),
        ("decompression bomb", png_claiming(40_000, 40_000), 413, "payload_too_large"),
        ("over max_image_pixels", encode(np.zeros((800, 1000, 3), np.uint8)), 413, "payload_too_large"),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_checkpoint):
    overrides = {
        "batchSize": 4,
        "maxBatchDelay": 100,
        "handler": {"max_image_pixels": MAX_PIXELS, "max_response_bytes": RESPONSE_LIMIT},
    }
    with running_server(tmp_path_factory.mktemp("reliability"), random_checkpoint, **overrides) as ts:
        yield ts


class Client:
    def __init__(self, server):
        self.url = f"{server.inference_url}/predictions/sam-fast"
        self.headers = server.auth()

    def raw(self, body: bytes) -> requests.Response:
        headers = {**self.headers, "Content-Type": "application/octet-stream"}
        return requests.post(self.url, data=body, headers=headers, timeout=600)

    def base64(self, body: bytes) -> requests.Response:
        headers = {**self.headers, "Content-Type": "text/plain"}
        return requests.post(self.url, data=base64.b64encode(body), headers=headers, timeout=600)

    def multipart(self, body: bytes, **fields) -> requests.Response:
        return requests.post(self.url, files={"data": ("upload", body)}, data=fields, headers=self.headers, timeout=600)

    def json(self, document: dict) -> requests.Response:
        return requests.post(self.url, json=document, headers=self.headers, timeout=600)


def assert_error(reply: requests.Response, status: int, kind: str, mentions: str = "") -> None:
    assert reply.status_code == status, (reply.status_code, reply.text[:300])
    body = reply.json()
    assert body["code"] == status and body["error"] == kind and body["message"], body
    assert mentions in body["message"], body


@pytest.fixture(scope="module")
def expected(server, chelsea, astronaut):
    """Each good image's annotations, from one request each before anything else ran."""
    client = Client(server)
    images = {
        "chelsea": encode(chelsea),
        "astronaut": encode(astronaut, "JPEG", quality=95),
        "chelsea-flipped": encode(np.ascontiguousarray(chelsea[:, ::-1])),
        "astronaut-crop": encode(astronaut[100:400, 50:450], "WEBP", lossless=True),
    }
    answers = {}
    for name, body in images.items():
        reply = client.raw(body)
        assert reply.status_code == 200, reply.text[:300]
        assert len(reply.content) < RESPONSE_LIMIT / 2
        answers[name] = decode_pickled(reply.text)
        assert len(answers[name]) == MASKS_PER_IMAGE
    assert len({json.dumps(a) for a in answers.values()}) == len(images)  # answers tell images apart
    return images, answers


@pytest.mark.parametrize("form", ["raw", "base64", "multipart"])
def test_bad_input_corpus(server, expected, chelsea, form):
    images, answers = expected
    client = Client(server)
    pid = server.worker_pids()
    for name, body, status, kind in bad_files(chelsea):
        assert_error(getattr(client, form)(body), status, kind)
        good = client.raw(images["chelsea"])
        assert good.status_code == 200 and decode_pickled(good.text) == answers["chelsea"], name
    assert server.worker_pids() == pid


def test_bad_requests_beyond_the_image(server, expected):
    images, answers = expected
    client = Client(server)
    pid = server.worker_pids()
    b64 = base64.b64encode(images["chelsea"]).decode()
    headers = {**client.headers, "Content-Type": "text/plain"}
    assert_error(
        requests.post(client.url, data="%%% not base64 %%%", headers=headers, timeout=60), 400, "bad_request", "base64"
    )
    assert_error(client.json({"picture": b64}), 400, "bad_request", '"image"')
    assert_error(client.json({"image": b64, "points_per_side": 0}), 422, "invalid_option", "'points_per_side'")
    assert_error(client.json({"image": b64, "colour": "red"}), 422, "invalid_option", "'colour'")
    assert_error(client.multipart(images["chelsea"], pred_iou_thresh="2"), 422, "invalid_option", "'pred_iou_thresh'")
    # Over max_response_bytes: a reason instead of a body TorchServe's frontend would drop the worker for.
    assert_error(client.json({"image": b64, "points_per_side": 16}), 422, "response_too_large", "max_response_bytes")
    options = client.json({"image": b64, "points_per_side": 2})
    assert options.status_code == 200 and len(decode_pickled(options.text)) == 2 * 2 * 3
    assert decode_pickled(client.raw(images["chelsea"]).text) == answers["chelsea"]
    assert server.worker_pids() == pid


def test_load_mixed_good_and_bad(server, expected, chelsea):
    """64 requests from 8 clients, half bad: each gets its own answer, no 5xx, none lost."""
    images, answers = expected
    client = Client(server)
    bad = bad_files(chelsea)
    names = list(images)
    pid = server.worker_pids()

    def one(i: int):
        if i % 2 == 0:
            name = names[(i // 2) % len(names)]
            reply = client.raw(images[name])
            return i, reply.status_code, reply.status_code == 200 and decode_pickled(reply.text) == answers[name]
        name, body, status, kind = bad[(i // 2) % len(bad)]
        reply = client.raw(body)
        return i, reply.status_code, reply.status_code == status and reply.json()["error"] == kind

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(64)))
    assert sorted(i for i, _, _ in results) == list(range(64))
    assert all(status < 500 for _, status, _ in results), results
    assert all(ok for _, _, ok in results), [r for r in results if not r[2]]
    assert server.worker_pids() == pid


def test_worker_killed_during_a_request(server, expected, astronaut, tmp_path):
    """TorchServe restarts a killed worker; the client's retry gets the answer; nothing is lost
    or duplicated in the run's results."""
    paths = []
    for i, image in enumerate((astronaut[::-1], astronaut[:, ::-1], astronaut[50:450])):
        paths.append(tmp_path / f"new{i}.png")
        paths[-1].write_bytes(encode(np.ascontiguousarray(image)))  # not cached: each runs the encoder
    old_pid = server.worker_pids()[0]
    worker = psutil.Process(old_pid)
    idle = sum(worker.cpu_times()[:2])
    run = subprocess.Popen(
        [*client_command(server), *map(str, paths), "--out", str(tmp_path / "out"), "--backoff", "2", "--retries", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def kill_while_working() -> None:
        # An idle worker uses no CPU: the first 50 ms it spends are a request in flight.
        deadline = time.monotonic() + 120
        while sum(worker.cpu_times()[:2]) < idle + 0.05 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(old_pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_while_working)
    killer.start()
    stdout, stderr = run.communicate(timeout=600)
    killer.join()
    assert run.returncode == 0, stderr
    assert "3 images: 3 segmented\n" in stdout
    assert server.worker_pids()[0] != old_pid
    client = Client(server)
    for path in paths:
        written = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        assert written == decode_pickled(client.raw(path.read_bytes()).text)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == sorted(f"{p.stem}.json" for p in paths)


def test_soak_worker_memory_is_flat(server, expected):
    """200 sequential requests: worker RSS after the first 20 and at the end differ by < 10%. A 2x2
    grid keeps each request short; every request still decodes, encodes and answers in full."""
    images, _ = expected
    client = Client(server)
    worker = psutil.Process(server.worker_pids()[0])
    rss_after_20 = first = None
    for i in range(200):
        reply = client.multipart(images["chelsea"], points_per_side="2")
        assert reply.status_code == 200
        first = first or reply.text
        if i == 19:
            rss_after_20 = worker.memory_info().rss
    assert reply.text == first and len(decode_pickled(first)) == 2 * 2 * 3
    rss_end = worker.memory_info().rss
    print(f"worker RSS after 20 requests {rss_after_20 / 2**20:.0f} MiB, after 200 {rss_end / 2**20:.0f} MiB")
    assert abs(rss_end - rss_after_20) / rss_after_20 < 0.10
