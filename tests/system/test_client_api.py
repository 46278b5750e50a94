"""SamClient in process against a real TorchServe: automatic masks and prompts (by image and by
image_id) equal to the server's answers to plain requests, options sent, each HTTP failure its
typed error; and the Python example of docs/client.md, run as it is written."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import pytest
import requests

from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import REPO, TorchServe
from sam_fast_serve.client import (
    Annotations,
    BadRequestError,
    NotAuthorized,
    SamClient,
    SamError,
    TransportError,
)
from sam_fast_serve.common.wire import IMAGE_ID_HEADER, decode_pickled

MASKS_PER_IMAGE = 16 * 3  # smoke config: 4x4 points, 3 masks each, nothing filtered


@pytest.fixture(scope="module")
def sam(server):
    with SamClient(server.inference_url, token=server.token()) as client:
        yield client


def direct(server, fields: dict, image: bytes | None = None) -> requests.Response:
    """The server's answer to a plain JSON request."""
    body = {**fields, **({"image": base64.b64encode(image).decode()} if image is not None else {})}
    headers = {**server.auth(), "Content-Type": "application/json"}
    return requests.post(f"{server.inference_url}/predictions/sam-fast", json=body, headers=headers, timeout=300)


def test_segment_a_path_or_bytes_with_options(server, sam, chelsea, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(encode(chelsea))
    reply = direct(server, {}, path.read_bytes())
    masks = sam.segment(path)
    assert isinstance(masks, Annotations) and isinstance(masks, list)
    assert masks == decode_pickled(reply.text) and len(masks) == MASKS_PER_IMAGE
    assert masks.image_id == reply.headers[IMAGE_ID_HEADER]

    coarse = sam.segment(path.read_bytes(), points_per_side=2, intensity="minmax")
    assert coarse == decode_pickled(
        direct(server, {"points_per_side": 2, "intensity": "minmax"}, path.read_bytes()).text
    )
    assert len(coarse) == 2 * 2 * 3

    with SamClient(server.inference_url, token=server.token(), wire="json") as as_json:
        assert as_json.segment(str(path), points_per_side=2, intensity="minmax") == coarse


def test_prompt_by_image_and_by_its_id(server, sam, astronaut):
    image = encode(astronaut)
    fields = {"points": [[150, 120], [60, 200]], "labels": [1, 0], "boxes": [[100, 50, 300, 260]]}
    sent = sam.prompt(image, **fields)
    assert sent == decode_pickled(direct(server, fields, image).text)
    assert len(sent["prompts"]) == 1 and len(sent["prompts"][0]["masks"]) == 1
    by_id = sam.prompt(sent["image_id"], **fields)
    assert by_id == sent
    assert sam.prompt(sent["image_id"], points=[[10, 10]], multimask=False)["prompts"][0]["masks"][0]["area"] >= 0


def test_each_http_failure_is_its_typed_error(server, sam, astronaut, tmp_path):
    truncated = encode(astronaut, "JPEG")[:5000]
    cases = [
        (lambda: sam.segment(truncated), 400, "bad_request"),
        (lambda: sam.segment(b"not an image"), 415, "unsupported_media_type"),
        (lambda: sam.prompt(encode(astronaut), points=[[9999, 10]]), 422, "invalid_option"),
        (lambda: sam.segment(encode(astronaut), page=3), 422, "invalid_option"),
        (lambda: sam.prompt("0" * 32, points=[[10, 10]]), 404, "not_found"),
    ]
    for call, status, kind in cases:
        with pytest.raises(BadRequestError) as refused:
            call()
        assert (refused.value.status, refused.value.kind) == (status, kind)
        assert refused.value.message and str(refused.value) == f"HTTP {status}: {refused.value.message}"
    with pytest.raises(BadRequestError) as refused:
        sam.segment(truncated)
    assert refused.value.message == direct(server, {}, truncated).json()["message"]

    with SamClient(server.inference_url, token="wrong") as wrong, pytest.raises(NotAuthorized) as unauthorized:
        wrong.segment(encode(astronaut))
    assert unauthorized.value.status == 400 and unauthorized.value.message.startswith("Token Authorization failed")
    with SamClient("http://127.0.0.1:9", token="", retries=1, backoff=0) as nowhere:
        with pytest.raises(TransportError) as unreachable:
            nowhere.segment(encode(astronaut))
    assert unreachable.value.status is None and "(after 2 attempts)" in unreachable.value.message
    assert isinstance(unreachable.value, SamError)
    with pytest.raises(FileNotFoundError):
        sam.segment(tmp_path / "missing.png")


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "client.md").read_text(), re.S)


def test_the_python_example_of_the_docs_runs(server):
    (example,) = [example for example in python_examples() if ".concepts(" not in example]
    environment = {**os.environ, "SAM_FAST_URL": server.inference_url, "TS_INFERENCE_TOKEN": server.token()}
    run = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, cwd=REPO, env=environment, timeout=600
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"{8 * 8 * 3} masks, the first covers ")
    assert lines[1].startswith("the click's best mask: [")
    assert lines[2].startswith("refused: 415 ") and len(lines) == 3


def test_the_concepts_example_of_the_docs_runs_against_sam3(tmp_path_factory, random_sam3_checkpoint):
    (example,) = [example for example in python_examples() if ".concepts(" in example]
    workdir = tmp_path_factory.mktemp("sam3")
    archive = smoke_archive(workdir, random_sam3_checkpoint, model_name="sam3")
    sam3 = TorchServe(workdir, archive.parent, {"sam3": archive.name})
    sam3.start()
    try:
        environment = {**os.environ, "SAM_FAST_URL": sam3.inference_url, "TS_INFERENCE_TOKEN": sam3.token()}
        # Keep-all thresholds, so that the example's records (random weights score about 0.25) are printed.
        kept = example.replace("max_instances=5)", "max_instances=5, threshold=0.0)")
        run = subprocess.run([sys.executable, "-c", kept], capture_output=True, text=True, cwd=REPO, env=environment)
    finally:
        sam3.stop()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 10 and {line.split()[0] for line in lines} == {"person", "flag"}
