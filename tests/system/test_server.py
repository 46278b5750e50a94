"""The handler end to end: a real archive in a real TorchServe on 127.0.0.1, token auth on."""

from __future__ import annotations

import base64
import json
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils

from harness.archives import run_client, running_server
from harness.files import encode, tiff, tiff_claiming
from harness.prompts import CASES, reference_answer
from harness.servers import REPO, free_port
from sam_fast_serve.common.intensity import rgb_for_sam
from sam_fast_serve.common.wire import decode_pickled, is_annotation_list

MASKS_PER_IMAGE = 16 * 3  # smoke config: 4x4 points, 3 masks each, nothing filtered


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_checkpoint):
    # fp32 so that prompted answers can be held to segment_anything's within 1e-3.
    with running_server(tmp_path_factory.mktemp("torchserve"), random_checkpoint, handler={"dtype": "float32"}) as ts:
        yield ts


def check_annotations(annotations, height, width):
    """Schema of every record, and that each RLE decodes to a mask consistent with its fields."""
    assert is_annotation_list(annotations)
    assert len(annotations) == MASKS_PER_IMAGE
    for ann in annotations:
        assert ann["segmentation"]["size"] == [height, width]
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.shape == (height, width)
        assert ann["area"] == int(mask.sum())
        assert len(ann["bbox"]) == 4 and len(ann["crop_box"]) == 4 and len(ann["point_coords"]) == 1
        assert ann["crop_box"] == [0.0, 0.0, float(width), float(height)]
        if ann["area"]:
            ys, xs = np.nonzero(mask)
            assert ann["bbox"][:2] == [float(xs.min()), float(ys.min())]
        assert all(type(v) is float for v in (ann["predicted_iou"], ann["stability_score"]))


def post(server, body, **kwargs):
    headers = {**server.auth(), **kwargs.pop("headers", {})}
    return requests.post(
        f"{server.inference_url}/predictions/sam-fast", data=body, headers=headers, timeout=300, **kwargs
    )


def test_shipped_config_binds_loopback_and_keeps_token_auth():
    properties = (REPO / "config.properties").read_text()
    for api in ("inference", "management", "metrics"):
        assert re.search(rf"^{api}_address=http://127\.0\.0\.1:\d+$", properties, re.M), api
    assert not re.search(r"^disable_token_authorization\s*=\s*true", properties, re.M)


def test_keys_outlive_a_long_running_server(server):
    """TorchServe expires its keys after token_expiration_min (default 60 minutes: a server would
    refuse everything after an hour); the shipped config makes them last ten years."""
    keys = json.loads(server.key_file.read_text())
    a_year = datetime.now(timezone.utc) + timedelta(days=365)
    for api in ("inference", "management"):
        expires = datetime.fromisoformat(keys[api]["expiration time"].replace("Z", "+00:00"))
        assert expires > a_year, (api, expires)


def test_archive_is_unpacked_in_the_servers_own_temp_folder(server):
    """TorchServe unpacks each archive under java.io.tmpdir and never removes it; the test servers
    point that at their own folder, which pytest's cleanup takes (in /tmp it grew to 47 GB)."""
    unpacked = list((server.workdir / "tmp" / "models").glob("*/custom_handler.py"))
    assert len(unpacked) == 1, unpacked


def test_request_without_token_is_refused(server, astronaut):
    reply = requests.post(f"{server.inference_url}/predictions/sam-fast", data=encode(astronaut), timeout=60)
    # TorchServe 0.12 answers a missing or wrong token with 400 "Token Authorization failed".
    assert reply.status_code in (400, 401), reply.text
    assert "token" in reply.text.lower()


def test_raw_multipart_and_json_requests_segment_the_same(server, astronaut):
    png = encode(astronaut)
    raw = post(server, png, headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == 200, raw.text[:500]
    annotations = decode_pickled(raw.text)
    check_annotations(annotations, *astronaut.shape[:2])

    multipart = requests.post(
        f"{server.inference_url}/predictions/sam-fast",
        files={"data": ("astronaut.png", png, "image/png")},
        headers=server.auth(),
        timeout=300,
    )
    assert multipart.status_code == 200, multipart.text[:500]
    assert decode_pickled(multipart.text) == annotations

    as_json = post(
        server,
        json.dumps({"image": base64.b64encode(png).decode()}),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    assert as_json.status_code == 200 and as_json.headers["Content-Type"].startswith("application/json")
    assert as_json.json() == annotations


def test_bad_image_gets_a_json_error_and_the_worker_goes_on(server, chelsea):
    pids = server.worker_pids()
    reply = post(server, b"this is not an image", headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 415
    body = reply.json()
    assert body["code"] == 415 and body["error"] == "unsupported_media_type" and "JPEG" in body["message"]
    good = post(server, encode(chelsea), headers={"Content-Type": "application/octet-stream"})
    assert good.status_code == 200
    check_annotations(decode_pickled(good.text), *chelsea.shape[:2])
    assert server.worker_pids() == pids


def test_inference_client(server, tmp_path, chelsea, astronaut):
    paths = []
    for name, image in (("chelsea", chelsea), ("astronaut", astronaut)):
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(encode(image))  # same pixels as earlier requests: cached embeddings
    run = run_client(*paths, "--out", tmp_path / "out", server=server, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "2 images: 2 segmented\n" in run.stdout
    for path, image in zip(paths, (chelsea, astronaut)):
        annotations = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        check_annotations(annotations, *image.shape[:2])
        assert (tmp_path / "out" / f"{path.stem}.overlay.png").stat().st_size > 1000
        assert f"{path}: {MASKS_PER_IMAGE} masks" in run.stdout


def test_inference_client_reports_errors_and_goes_on(server, tmp_path, chelsea):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(encode(chelsea))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = run_client(bad, good, "--out", tmp_path / "out", server=server)
    assert run.returncode == 1
    assert "bad.png: FAILED: HTTP 400" in run.stderr
    assert "2 images: 1 segmented, 1 failed" in run.stdout


def test_inference_client_when_server_is_down(tmp_path, chelsea):
    image = tmp_path / "c.png"
    image.write_bytes(encode(chelsea))
    url = f"http://127.0.0.1:{free_port()}"
    # A token that begins with "-" (TorchServe's may) is taken whole when written --token=VALUE.
    args = ("--url", url, "--token=-dash-first", "--retries", 1, "--backoff", 0.1, "--out", tmp_path / "out")
    run = run_client(image, *args, timeout=120)
    assert run.returncode == 1 and "cannot reach" in run.stderr and "after 2 attempts" in run.stderr


@pytest.fixture(scope="module")
def served_reference(random_checkpoint, astronaut):
    """segment_anything's SamPredictor on the served model (test_vit, fp32), the astronaut set."""
    from segment_anything import SamPredictor

    from sam_fast_serve.models.registry import sam_model_fast_registry

    predictor = SamPredictor(sam_model_fast_registry["test_vit"](str(random_checkpoint)))
    predictor.set_image(astronaut)
    return predictor


def test_prompts_through_torchserve_match_sam_predictor(server, served_reference, astronaut):
    b64 = base64.b64encode(encode(astronaut)).decode()
    for case in ("mixed points", "several boxes", "box and points"):
        reply = post(server, json.dumps({"image": b64, **CASES[case]}), headers={"Content-Type": "application/json"})
        assert reply.status_code == 200, reply.text[:300]
        answer = decode_pickled(reply.text)
        ref_masks, ref_scores = reference_answer(served_reference, CASES[case], multimask=False)
        for prompt, ref_prompt_masks, ref_prompt_scores in zip(answer["prompts"], ref_masks, ref_scores, strict=True):
            (mask,) = prompt["masks"]
            ours = mask_utils.decode(mask["segmentation"]).astype(bool)
            ref = ref_prompt_masks[0]
            assert (ours & ref).sum() / max(1, (ours | ref).sum()) >= 0.99
            assert abs(mask["predicted_iou"] - float(ref_prompt_scores[0])) < 1e-3


def test_image_id_then_concurrent_prompts_on_one_image(server, astronaut):
    first = post(server, encode(astronaut), headers={"Content-Type": "application/octet-stream"})
    image_id = first.headers["X-Image-Id"]
    clicks = [[[40.0 + 50 * i, 60.0 + 40 * i]] for i in range(8)]

    def ask(points):
        reply = post(
            server,
            json.dumps({"image_id": image_id, "points": points}),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        assert reply.status_code == 200, reply.text[:300]
        return reply.json()

    sequential = [ask(points) for points in clicks]
    assert len({json.dumps(a) for a in sequential}) == len(clicks)  # different clicks, different masks
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, clicks))
    assert concurrent == sequential


def test_prompt_as_multipart_form_fields(server, chelsea):
    reply = requests.post(
        f"{server.inference_url}/predictions/sam-fast",
        files={"image": ("c.png", encode(chelsea), "image/png")},
        data={"points": "[[100, 120], [300, 200]]", "labels": "[1, 0]"},
        headers=server.auth(),
        timeout=300,
    )
    assert reply.status_code == 200, reply.text[:300]
    answer = decode_pickled(reply.text)
    assert len(answer["prompts"]) == 1 and len(answer["prompts"][0]["masks"]) == 1
    bad = requests.post(
        f"{server.inference_url}/predictions/sam-fast",
        files={"image": ("c.png", encode(chelsea), "image/png")},
        data={"points": "[[1000, 120]]"},
        headers=server.auth(),
        timeout=300,
    )
    assert bad.status_code == 422 and "'points'" in bad.json()["message"]


def test_inference_client_with_prompts(server, tmp_path, astronaut):
    path = tmp_path / "astronaut.png"
    path.write_bytes(encode(astronaut))
    prompts = ["--point", "200,150", "--point", "320,400:0", "--box", "100,50,400,460", "--box", "10,300,200,500"]
    run = run_client(path, "--out", tmp_path / "out", *prompts, server=server)
    assert run.returncode == 0, run.stderr
    answer = json.loads((tmp_path / "out" / "astronaut.json").read_text())
    assert len(answer["prompts"]) == 2 and all(len(p["masks"]) == 1 for p in answer["prompts"])
    assert "2 masks" in run.stdout
    assert (tmp_path / "out" / "astronaut.overlay.png").stat().st_size > 1000


def test_out_of_memory_is_a_507_and_the_worker_goes_on(server, chelsea):
    """Cap the worker's address space 300 MiB above its current size, send a 48-megapixel image
    (just under the 50-megapixel default: its masks need about 800 MiB more; a 25-megapixel one
    needed 260-300, too close to the cap), then lift the cap: 507 with a reason, same worker, next OK."""
    import resource

    import psutil

    pid = int(server.worker_pids()[0])
    worker = psutil.Process(pid)
    huge = encode(np.kron(chelsea, np.ones((20, 20, 1), np.uint8))[:6000, :8000])
    cap = worker.memory_info().vms + 300 * 2**20
    # Only the soft limit moves: raising a hard limit back needs privileges CI may not have.
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    try:
        resource.prlimit(pid, resource.RLIMIT_AS, (cap, hard))
    except PermissionError:
        pytest.skip("this environment does not let a test limit another process's memory")
    try:
        reply = post(server, huge, headers={"Content-Type": "application/octet-stream"})
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
    assert reply.status_code == 507, reply.text[:300]
    assert reply.json()["error"] == "out_of_memory"
    good = post(server, encode(chelsea), headers={"Content-Type": "application/octet-stream"})
    assert good.status_code == 200 and int(server.worker_pids()[0]) == pid


def test_metrics_port_speaks_prometheus_with_handler_time(server, chelsea):
    """The shipped config's metrics mode: GET /metrics (no token) in Prometheus text, with TorchServe's
    own HandlerTime (its BaseHandler.handle records it: the handler keeps that method and supplies
    preprocess -> inference -> postprocess) and the handler's metrics. tests/test_metrics.py checks
    the values through a real Prometheus."""
    reply = post(server, encode(chelsea), headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 200
    deadline = time.monotonic() + 10
    while (handler_time := server.metric("HandlerTime", ModelName="sam-fast")) is None:
        assert time.monotonic() < deadline, "no HandlerTime on the metrics API"
        time.sleep(0.2)
    assert handler_time > 0
    assert "# TYPE sam_stage_seconds histogram" in server.metrics_text()
    assert (server.metric("sam_answers_total", ModelName="sam-fast", status="200") or 0) >= 1


def _answer(server, image: bytes, **options) -> requests.Response:
    body = json.dumps({"image": base64.b64encode(image).decode(), **options})
    return post(server, body, headers={"Content-Type": "application/json", "Accept": "application/json"})


def test_scientific_tiffs_segment_as_the_8_bit_images_they_become(server, chelsea):
    """12-bit-in-16 (auto: percentile stretch), float32 with NaNs, a 3-page stack, 5 channels and an
    LZW-compressed file, each answered as the 8-bit PNG of what the service makes of it; hostile
    TIFFs are 4xx and the worker goes on."""
    gray = chelsea.mean(axis=2).astype(np.uint8)
    pids = server.worker_pids()
    twelve = (gray.astype(np.uint16) * 16 + 7).astype(np.uint16)
    floats = gray.astype(np.float32) / 255
    floats[::7, ::5] = np.nan
    stack = np.stack([gray, 255 - gray, gray // 2])
    planes = np.stack([gray, 255 - gray, gray // 2, gray // 3, gray // 4], axis=-1)
    cases = [
        (tiff(twelve), {}, rgb_for_sam(twelve[:, :, None])),
        (tiff(twelve, compression="lzw"), {}, rgb_for_sam(twelve[:, :, None])),
        (tiff(floats), {"intensity": "minmax"}, rgb_for_sam(floats[:, :, None], mode="minmax")),
        (tiff(stack, photometric="minisblack"), {"page": 2}, rgb_for_sam(stack[2][:, :, None])),
        (tiff(planes, photometric="minisblack", planarconfig="contig"), {}, rgb_for_sam(planes[:, :, :1])),
        (
            tiff(planes, photometric="minisblack", planarconfig="contig"),
            {"channels": [4, 1, 2]},
            planes[:, :, [4, 1, 2]],
        ),
    ]
    for data, options, as_8_bit in cases:
        reply = _answer(server, data, **options)
        assert reply.status_code == 200, (options, reply.text[:300])
        assert reply.json() == _answer(server, encode(np.ascontiguousarray(as_8_bit))).json(), options
        check_annotations(reply.json(), *gray.shape)
    missing_page = _answer(server, tiff(stack, photometric="minisblack"), page=3)
    assert missing_page.status_code == 422 and "the TIFF has 3 page(s)" in missing_page.json()["message"]
    missing_channel = _answer(server, tiff(planes, photometric="minisblack", planarconfig="contig"), channels=[5])
    assert missing_channel.status_code == 422 and "5 channel(s)" in missing_channel.json()["message"]
    bad_offset = bytearray(tiff(twelve))
    bad_offset[4:8] = struct.pack("<I", 10**9)
    for body, status in (
        (tiff_claiming(10**6, 10**6), 413),
        (bytes(bad_offset), 400),
        (tiff(np.zeros((8, 8), np.complex64)), 415),
    ):
        reply = post(server, body, headers={"Content-Type": "application/octet-stream"})
        assert reply.status_code == status, reply.text[:300]
        assert reply.json()["message"]
    assert server.worker_pids() == pids
    assert post(server, tiff(twelve), headers={"Content-Type": "application/octet-stream"}).status_code == 200


def test_client_coco_records_the_size_of_scientific_tiffs(server, tmp_path, chelsea):
    gray = chelsea.mean(axis=2).astype(np.uint8)[:200, :320]
    files = {
        "twelve.tif": tiff((gray.astype(np.uint16) * 16).astype(np.uint16)),
        "float.tiff": tiff(gray.astype(np.float32) / 255),
        "five.tif": tiff(
            np.stack([gray] * 5, axis=-1), photometric="minisblack", planarconfig="contig", compression="zlib"
        ),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    run = run_client(tmp_path, "--out", tmp_path / "out", "--coco", tmp_path / "coco.json", server=server)
    assert run.returncode == 0, run.stdout + run.stderr
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert {image["file_name"]: (image["width"], image["height"]) for image in coco["images"]} == {
        name: (320, 200) for name in files
    }
    for name in files:
        assert (tmp_path / "out" / f"{Path(name).stem}.overlay.png").stat().st_size > 1000
