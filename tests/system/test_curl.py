"""Every curl and sam-fast-client command of README.md and docs/*.md, run against a real TorchServe.

The rule the docs follow (a curl or sam-fast-client line that is neither run nor excluded fails
test_every_curl_line_is_run_or_excluded):
- A fenced block whose info string is `sh` and that has a line starting with `curl` or with
  `sam-fast-client` is run whole, top to bottom, as one bash script with `set -euo pipefail`, so
  every command in it must succeed (sam-fast-client exits 0 only when every image or video is done);
  curl runs as `curl --fail-with-body --silent --show-error`, so an HTTP error status fails it too.
  A backslash at the end of a line continues it, as in any shell.
- It runs as a user pastes it at the root of a checkout whose TorchServe `make serve` started: in a
  fresh folder holding a copy of every file of the checkout's samples/ (nothing else of it: a file
  a command names is there or made by an earlier line of the block), inference.py, .venv (this
  test's virtualenv) and TorchServe's key_file.json, the server recorded for the client as `make
  serve` records it (in a state folder of the test's own); `$TOKEN` already set to the inference
  token, `$SAM_FAST_URL` to the inference address, `python` and `sam-fast-client`
  this test's virtualenv's, and the shipped config.properties' addresses http://127.0.0.1:8080,
  :8081 and :8082 (inference, management, metrics) pointing at the test's TorchServe, whose model
  is `sam-fast` (test_vit with random weights, the smoke config's small grid and the default
  thresholds, which no random mask passes: automatic answers are empty, prompted ones are not).
  samples/astronaut.jpg is the checkout's photo enlarged past 128 KiB, the most one command-line
  argument may hold: a command that puts the image itself in its command line fails here as it
  would for a user's large file (use `-d @body.json`, `--data-binary @file`, `-T file`).
- samples/clip.mp4 and samples/stack.tif are as a fresh clone has them (samples/README.md); a block
  that names either sends a video, and its `sam-fast` is a SAM 2.1 model (test_sam2.1_hiera,
  random weights) of the same TorchServe: its `/predictions/sam-fast` and its sam-fast-client
  commands (`--model sam2-fast`) go there.
- The same TorchServe serves `sam3` (test_sam3, random weights), which the docs' concept examples
  name themselves (`/predictions/sam3`, `--model sam3`).
- A block fenced `sh not-run` is never run: it needs what this test does not start (a gateway,
  another host, a cluster); the text around it says what.
- A line starting with `curl` or `sam-fast-client` in any other fenced block (`bash`, `console`, no
  info string, ...) fails the test.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from harness.archives import KEEP_ALL, smoke_archive
from harness.pages import CLIENT_LINE, Block, fenced_blocks
from harness.servers import REPO, TorchServe
from sam_fast_serve.common.endpoint import record_server
from sam_fast_serve.common.options import AmgSettings
from sam_fast_serve.tools.torchserve import read_ports

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN, NOT_RUN = "sh", "sh not-run"
# The shipped config.properties' HTTP listeners, which the docs' commands name.
SHIPPED_PORTS = {
    api: port
    for api, port in read_ports((REPO / "config.properties").read_text()).items()
    if api in ("inference", "management", "metrics")
}
PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error "$@"; }
"""


def has_command(block: Block) -> bool:
    return block.has_curl() or block.has_client()


ALL_BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.info == RUN and has_command(block)]


def test_every_curl_line_is_run_or_excluded():
    stray = [block.where for block in ALL_BLOCKS if has_command(block) and block.info not in (RUN, NOT_RUN)]
    assert stray == [], f"curl or sam-fast-client lines in blocks neither ```{RUN} nor ```{NOT_RUN}: {stray}"
    assert any(block.page.name == "README.md" for block in RUN_BLOCKS), "README's curl examples are not run"
    assert len(RUN_BLOCKS) >= 5, [block.where for block in RUN_BLOCKS]
    client_blocks = [block.where for block in RUN_BLOCKS if block.has_client()]
    assert any(where.startswith("README.md") for where in client_blocks), "README's client run is not run"
    assert len(client_blocks) >= 5, client_blocks


def test_block_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```sh\nTOKEN=x\ncurl -H a \\\n  http://127.0.0.1:8080/ping\n```\n"
        "```sh not-run\ncurl http://team-host:8000/ping\n```\n```bash\necho\n    curl -V\n```\n"
    )
    blocks = fenced_blocks(page)
    assert [(b.info, b.line, b.has_curl()) for b in blocks] == [
        ("sh", 3, True),
        ("sh not-run", 8, True),
        ("bash", 11, True),
    ]
    assert blocks[0].text == "TOKEN=x\ncurl -H a \\\n  http://127.0.0.1:8080/ping\n"
    assert not any(b.has_client() for b in blocks)
    assert Block(page, "sh", 1, ". .venv/bin/activate  # sam-fast-client\n  sam-fast-client a.jpg\n").has_client()
    assert not Block(page, "sh", 1, "echo sam-fast-client  # sam-fast-client\nsam-fast-clients x\n").has_client()


VIDEO_SAMPLES, VIDEO_MODEL = ("samples/clip.mp4", "samples/stack.tif"), "sam2-fast"
# The name docs/concepts.md serves SAM 3 under (make ... MODEL_NAME=sam3).
CONCEPT_MODEL = "sam3"


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_checkpoint, random_sam2_checkpoint, random_sam3_checkpoint):
    # The default thresholds: the smoke config keeps every mask, which the docs' examples do not expect.
    thresholds = {key: getattr(AmgSettings(), key) for key in KEEP_ALL}
    workdir = tmp_path_factory.mktemp("torchserve")
    image = smoke_archive(workdir, random_checkpoint, handler=thresholds)
    video = smoke_archive(workdir, random_sam2_checkpoint, model_name=VIDEO_MODEL)
    concepts = smoke_archive(workdir, random_sam3_checkpoint, model_name=CONCEPT_MODEL)
    models = {"sam-fast": image.name, VIDEO_MODEL: video.name, CONCEPT_MODEL: concepts.name}
    ts = TorchServe(workdir, image.parent, models)
    ts.start()
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def large_sample() -> bytes:
    """The checkout's sample photo, enlarged until its base64 is over one command-line argument's limit."""
    photo = Image.open(REPO / "samples" / "astronaut.jpg").convert("RGB")
    large = photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    large.save(out, "JPEG", quality=95)
    assert len(out.getvalue()) * 4 / 3 > 128 * 1024
    return out.getvalue()


def script_for(block: Block, server: TorchServe) -> str:
    """The block's text with the shipped addresses swapped for the test server's (and the model,
    for a block that sends a video)."""
    text = block.text
    if any(sample in text for sample in VIDEO_SAMPLES):
        text = text.replace("/predictions/sam-fast", f"/predictions/{VIDEO_MODEL}")
        # After the command's name, where a trailing comment or continuation cannot swallow it.
        text = CLIENT_LINE.sub(lambda found: f"{found.group(0)} --model {VIDEO_MODEL}", text)
    for api, shipped in SHIPPED_PORTS.items():
        text = text.replace(f"127.0.0.1:{shipped}", f"127.0.0.1:{server.ports[api]}")
    return PRELUDE + text


def test_video_blocks_go_to_the_video_model():
    server = SimpleNamespace(ports={"inference": 9080, "management": 9081, "metrics": 9082})
    text = (
        "sam-fast-client samples/clip.mp4 --point 80,60  # a comment\ncurl http://127.0.0.1:8080/predictions/sam-fast\n"
    )
    script = script_for(Block(REPO / "page.md", RUN, 1, text), server)
    assert script == PRELUDE + (
        f"sam-fast-client --model {VIDEO_MODEL} samples/clip.mp4 --point 80,60  # a comment\n"
        f"curl http://127.0.0.1:9080/predictions/{VIDEO_MODEL}\n"
    )
    image = Block(REPO / "page.md", RUN, 1, "sam-fast-client samples/astronaut.jpg\n")
    assert script_for(image, server) == PRELUDE + image.text


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda block: block.where)
def test_curl_block_runs(block, server, large_sample, tmp_path, monkeypatch):
    shutil.copytree(REPO / "samples", tmp_path / "samples")
    (tmp_path / "samples" / "astronaut.jpg").write_bytes(large_sample)
    shutil.copy(REPO / "inference.py", tmp_path / "inference.py")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    shutil.copy(server.key_file, tmp_path / "key_file.json")  # read afresh: a block may rotate the keys
    # The server recorded for the client as `make serve` records it, in a state folder of the test's own.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    record_server(server.inference_url, tmp_path / "key_file.json")
    script = tmp_path / "block.sh"
    script.write_text(script_for(block, server))
    env = dict(
        os.environ,
        TOKEN=server.token(),
        SAM_FAST_URL=server.inference_url,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    # -x: the failing command is the last one traced; an error body is in the file it wrote (-o).
    ran = subprocess.run(
        ["bash", "-x", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    if ran.returncode != 0:
        trace = "\n".join(line[:400] for line in [*ran.stdout.splitlines()[-4:], *ran.stderr.splitlines()[-8:]])
        bodies = {
            p.name: p.read_bytes()[:1000]
            for p in tmp_path.iterdir()
            if p.is_file() and p.stat().st_size < 4096 and p.name not in ("key_file.json", "block.sh")
        }
        pytest.fail(f"{block.where} failed (exit {ran.returncode}):\n{block.text}\n{trace}\nsmall files: {bodies}")
