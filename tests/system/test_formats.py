"""Every answer format through a real TorchServe, asked for with the real curl: pickle, JSON, the
label PNG of automatic generation, and a prompt's mask PNG and RGBA cutout, for both model families;
each picture checked against what the JSON answer to the same request says it must be. And the
refusals (406, 422), alone and in a batch shared with good requests."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import REPO, TorchServe
from sam_fast_serve.common.labels import label_image
from sam_fast_serve.common.wire import decode_pickled, is_annotation_list, is_prompt_response

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")

# One TorchServe, one model of each family (the smoke config keeps every mask). sam-fast takes
# batches of 4 so that concurrent requests share one handler call.
MODELS = {"sam-fast": "random_checkpoint", "sam2": "random_sam2_checkpoint"}
BATCH = 4
POINT = {"points": [[200.0, 150.0]]}  # a lone click: three masks (multimask by default)
BOXES = {"boxes": [[100.0, 50.0, 400.0, 460.0], [10.0, 300.0, 200.0, 500.0]], "multimask": True}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("formats")
    archives = {
        "sam-fast": smoke_archive(
            workdir, request.getfixturevalue(MODELS["sam-fast"]), "sam-fast", batchSize=BATCH, maxBatchDelay=500
        ),
        "sam2": smoke_archive(workdir, request.getfixturevalue(MODELS["sam2"]), "sam2"),
    }
    (workdir / "torchserve").mkdir()
    ts = TorchServe(workdir / "torchserve", workdir / "model_store", {n: a.name for n, a in archives.items()})
    ts.start()
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, astronaut) -> Path:
    """The astronaut as a PNG: lossless, so the decoded input is exactly `astronaut`."""
    path = tmp_path_factory.mktemp("inputs") / "astronaut.png"
    path.write_bytes(encode(astronaut))
    return path


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def picture(self) -> Image.Image:
        assert self.status == 200 and self.content_type == "image/png", (self.status, self.body[:300])
        image = Image.open(io.BytesIO(self.body))
        image.load()
        return image

    def error(self) -> dict:
        assert self.content_type.startswith("application/json"), self.content_type
        return json.loads(self.body)


class Curl:
    """Requests to one model of `server` made by the curl binary, each body and headers to a file."""

    def __init__(self, server: TorchServe, model: str, workdir: Path) -> None:
        self.url = f"{server.inference_url}/predictions/{model}"
        self.token = server.token()
        self.workdir = workdir
        self.calls = 0

    def command(self, *args: str, accept: str | None = None) -> tuple[list[str], Path, Path]:
        self.calls += 1
        body, headers = self.workdir / f"answer{self.calls}", self.workdir / f"headers{self.calls}"
        command = ["curl", "-sS", "--max-time", "300", "-o", str(body), "-D", str(headers), "-w", "%{http_code}"]
        command += ["-H", f"Authorization: Bearer {self.token}"]
        if accept is not None:
            command += ["-H", f"Accept: {accept}"]
        return [*command, *args, self.url], body, headers

    @staticmethod
    def finish(run: subprocess.CompletedProcess, body: Path, headers: Path) -> Answer:
        assert run.returncode == 0, run.stderr
        # The last header block is the answer's (curl writes a "100 Continue" block before it for large bodies).
        block = headers.read_text().strip().split("\r\n\r\n")[-1]
        fields = dict(line.split(":", 1) for line in block.splitlines()[1:] if ":" in line)
        return Answer(int(run.stdout), {k.strip().lower(): v.strip() for k, v in fields.items()}, body.read_bytes())

    @classmethod
    def run(cls, call: tuple[list[str], Path, Path]) -> Answer:
        command, body, headers = call
        return cls.finish(subprocess.run(command, capture_output=True, text=True, timeout=330), body, headers)

    def file(self, path: Path, accept: str | None = None) -> Answer:
        """The image file as the raw body: automatic generation."""
        return self.run(
            self.command("-H", "Content-Type: application/octet-stream", "--data-binary", f"@{path}", accept=accept)
        )

    def json_command(
        self, document: dict, accept: str | None = None, image: Path | None = None
    ) -> tuple[list[str], Path, Path]:
        """`document` (with `image` base64-encoded into it) as a JSON body, written to a file first."""
        if image is not None:
            document = {"image": base64.b64encode(image.read_bytes()).decode(), **document}
        path = self.workdir / f"body{self.calls + 1}.json"  # the number of the answer it gets
        path.write_text(json.dumps(document))
        return self.command("-H", "Content-Type: application/json", "--data-binary", f"@{path}", accept=accept)

    def json(self, document: dict, accept: str | None = None, image: Path | None = None) -> Answer:
        return self.run(self.json_command(document, accept, image))


@pytest.fixture(params=list(MODELS))
def curl(request, server, tmp_path) -> Curl:
    return Curl(server, request.param, tmp_path)


def decoded(record: dict) -> np.ndarray:
    return mask_utils.decode(record["segmentation"]).astype(bool)


def best(prompt: dict) -> dict:
    """The mask of a prompt an image/png answer shows: the highest predicted IoU, the first of equals."""
    return max(prompt["masks"], key=lambda mask: mask["predicted_iou"])


def test_automatic_answers_as_pickle_json_and_a_label_png(curl, image_file, astronaut):
    pickled = curl.file(image_file)
    assert pickled.status == 200 and pickled.content_type.startswith("text/plain"), pickled.body[:300]
    records = decode_pickled(pickled.body)
    assert is_annotation_list(records) and len(records) > 1
    as_json = curl.file(image_file, accept="application/json")
    assert as_json.status == 200 and as_json.content_type.startswith("application/json")
    assert json.loads(as_json.body) == records

    labels = curl.file(image_file, accept="image/png").picture()
    assert labels.mode == "I;16" and labels.size == (astronaut.shape[1], astronaut.shape[0])
    expected = label_image(records, astronaut.shape[:2])
    assert len(np.unique(expected)) > 2  # several masks show: the comparison below means something
    np.testing.assert_array_equal(np.asarray(labels), expected)
    # Every 200 names the image; the same pixels are the same image in every format.
    ids = {answer.headers["x-image-id"] for answer in (pickled, as_json, curl.file(image_file, accept="image/*"))}
    assert len(ids) == 1


def test_a_prompt_as_a_png_mask_is_its_best_mask(curl, image_file, astronaut):
    answer = json.loads(curl.json(POINT, "application/json", image_file).body)
    assert is_prompt_response(answer)
    (prompt,) = answer["prompts"]
    assert len(prompt["masks"]) == 3  # multimask: the picture is the best-scoring of the three
    mask = curl.json(POINT, "image/png", image_file).picture()
    assert mask.mode == "L" and mask.size == (astronaut.shape[1], astronaut.shape[0])
    pixels = np.asarray(mask)
    assert set(np.unique(pixels)) == {0, 255}
    np.testing.assert_array_equal(pixels == 255, decoded(best(prompt)))
    assert not np.array_equal(pixels == 255, decoded(prompt["masks"][0]))  # the pick matters: the first is another
    # The same mask by image_id, without sending the image again; `output: mask` is the default.
    by_id = curl.json({"image_id": answer["image_id"], **POINT, "output": "mask"}, "image/png").picture()
    np.testing.assert_array_equal(np.asarray(by_id), pixels)


def test_a_prompt_as_a_cutout_is_the_image_with_the_mask_as_alpha(curl, image_file, astronaut):
    answer = json.loads(curl.json(POINT, "application/json", image_file).body)
    cutout = curl.json({**POINT, "output": "cutout"}, "image/png", image_file)
    assert cutout.headers["x-image-id"] == answer["image_id"]
    pixels = np.asarray(cutout.picture())
    assert pixels.shape == (*astronaut.shape[:2], 4)
    np.testing.assert_array_equal(pixels[..., :3], astronaut)
    np.testing.assert_array_equal(pixels[..., 3], np.where(decoded(best(answer["prompts"][0])), 255, 0))


def test_several_prompts_as_a_png_are_the_union_of_their_best_masks(curl, image_file):
    answer = json.loads(curl.json(BOXES, "application/json", image_file).body)
    masks = [decoded(best(prompt)) for prompt in answer["prompts"]]
    assert len(masks) == 2 and all(len(prompt["masks"]) == 3 for prompt in answer["prompts"])
    assert not np.array_equal(masks[0], masks[1])  # two boxes, two masks: the union is neither
    union = np.asarray(curl.json(BOXES, "image/png", image_file).picture()) == 255
    np.testing.assert_array_equal(union, masks[0] | masks[1])


@pytest.mark.parametrize(
    ("accept", "document", "status", "words"),
    [
        ("application/xml", POINT, 406, ["application/xml", "text/plain", "application/json", "image/png"]),
        ("image/png;q=0, text/html", {}, 406, ["image/png"]),
        ("application/json", {**POINT, "output": "mask"}, 422, ["'output'", "image/png"]),
        ("image/png", {**POINT, "output": "outline"}, 422, ["'output'", "mask, cutout", "'outline'"]),
        ("image/png", {"output": "cutout"}, 422, ["'output'", "prompted", "label image"]),
        ("image/png", {**POINT, "return_logits": True}, 422, ["'return_logits'", "application/json"]),
        ("image/png", {**POINT, "image_id": "0" * 32, "output": "cutout"}, 422, ["'cutout'", "image_id"]),
    ],
)
def test_refusals_say_why(server, tmp_path, image_file, accept, document, status, words):
    curl = Curl(server, "sam-fast", tmp_path)
    pids = server.worker_pids()
    answer = curl.json(document, accept, None if "image_id" in document else image_file)
    assert answer.status == status, answer.body[:300]
    body = answer.error()
    assert body["code"] == status and all(word in body["message"] for word in words), body
    assert "x-image-id" not in answer.headers
    assert server.worker_pids() == pids


def refusals(server: TorchServe) -> float:
    return server.metric("sam_answers_total", ModelName="sam-fast", status="406") or 0.0


def test_requests_sharing_a_batch_each_get_their_own_format_and_refusals(server, tmp_path, image_file):
    curl = Curl(server, "sam-fast", tmp_path)
    refused_before = refusals(server)
    expected = json.loads(curl.json(POINT, "application/json", image_file).body)
    requests = [
        ({**POINT, "output": "cutout"}, "image/png"),
        (POINT, "application/xml"),
        ({**POINT, "output": "outline"}, "image/png"),
        (POINT, "application/json"),
    ]
    assert len(requests) == BATCH
    prepared = [curl.json_command(document, accept, image_file) for document, accept in requests]
    with ThreadPoolExecutor(BATCH) as pool:
        cutout, not_acceptable, invalid, as_json = pool.map(Curl.run, prepared)
    alpha = np.asarray(cutout.picture())[..., 3]
    np.testing.assert_array_equal(alpha == 255, decoded(best(expected["prompts"][0])))
    assert not_acceptable.status == 406 and invalid.status == 422
    assert json.loads(as_json.body) == expected
    deadline = time.monotonic() + 30  # the frontend reads a worker's metrics from its log, a little later
    while refusals(server) < refused_before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert refusals(server) >= refused_before + 1


def page_commands() -> list[str]:
    """The commands of docs/formats.md's sh blocks, in order; the line that sets $TOKEN left out
    (the test sets it)."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "docs" / "formats.md").read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("TOKEN=")]


def test_the_formats_page_curl_examples_give_what_it_says(server, tmp_path):
    (tmp_path / "samples").symlink_to(REPO / "samples")
    environment = dict(os.environ, TOKEN=server.token())
    runs = []
    for command in page_commands():
        command = command.replace("http://127.0.0.1:8080", server.inference_url)
        runs.append(
            subprocess.run(command, shell=True, cwd=tmp_path, env=environment, capture_output=True, timeout=330)
        )
        assert runs[-1].returncode == 0, (command[:200], runs[-1].stderr)
    records = json.loads((tmp_path / "masks.json").read_bytes())
    assert is_annotation_list(records) and records == decode_pickled((tmp_path / "masks.b64").read_bytes())
    size = tuple(records[0]["segmentation"]["size"])
    labels = Image.open(tmp_path / "labels.png")
    assert labels.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(labels), label_image(records, size))
    mask = Image.open(tmp_path / "mask.png")
    cutout = np.asarray(Image.open(tmp_path / "cutout.png"))
    assert mask.mode == "L" and cutout.shape == (*size, 4)
    np.testing.assert_array_equal(cutout[..., 3], np.asarray(mask))
