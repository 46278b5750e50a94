"""README's first run, typed as a new user types it: in a new shell (no virtualenv activated) at the
root of a fresh copy of the checkout, on a machine where another TorchServe runs already (started
the plain way: its pid file in the machine's temp folder, gRPC on TorchServe's default ports), from
`make serve` to a segmented folder and `make stop`, reading no log file.

Two stand-ins, as nothing can be downloaded here: the copy's .venv is this test's virtualenv (CI runs
README's install line itself, first), and the weights `make serve` would download are the test
architecture's random ones (MODEL_CONFIG and SAM_CHECKPOINT in the environment, which make reads).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from harness.pages import fenced_blocks
from harness.servers import REPO, free_port, free_server_port
from sam_fast_serve.tools.torchserve import RunFolder, busy, read_ports, with_ports

INSTALL_LINE = "bash install_segment_anything_fast.sh"
VENV_BIN = str(Path(sys.executable).parent)


def readme_block(heading: str) -> str:
    """The first `sh` block under README's `## heading`."""
    page = REPO / "README.md"
    section = page.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return next(b.text for b in fenced_blocks(page) if b.info == "sh" and b.text in section)


@pytest.fixture(scope="module")
def other_torchserve(tmp_path_factory) -> Iterator[subprocess.Popen]:
    """Someone else's TorchServe, started as TorchServe's docs start it: the pid file in /tmp, gRPC
    on 7070 and 7071 (its HTTP listeners on free ports, so that the test never meets a real one)."""
    folder = tmp_path_factory.mktemp("other")
    properties = (REPO / "config.properties").read_text()
    ports = read_ports(properties)
    http = {name: free_port() for name in ("inference", "management", "metrics")}
    (folder / "config.properties").write_text(with_ports(properties, http))
    (folder / "model_store").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP")}
    process = subprocess.Popen(
        [f"{VENV_BIN}/torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and not busy({"grpc": ports["grpc_inference"]}):
            time.sleep(0.5)
        if process.poll() is not None or not busy({"grpc": ports["grpc_inference"]}):
            pytest.skip("another program holds TorchServe's default ports here: the other server cannot start")
        yield process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory, random_checkpoint) -> Path:
    """A copy of the files a clone has, its .venv this test's."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    clone = tmp_path_factory.mktemp("clone") / "sam-fast-serve"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    (clone / ".venv").symlink_to(Path(VENV_BIN).parent)
    return clone


def new_shell_env(clone: Path, checkpoint: Path, state: Path) -> dict[str, str]:
    """A new shell's environment: no virtualenv on PATH; the weights' stand-in for make."""
    config = yaml.safe_load((REPO / "tests" / "smoke-config.yaml").read_text())
    config["handler"].update(model_type="test_vit", sam_checkpoint=checkpoint.name)
    (clone / "test-vit-config.yaml").write_text(yaml.safe_dump(config))
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != VENV_BIN)
    # Nor what a make running this test passes down (MAKELEVEL makes the user's make print directories).
    dropped = ("VIRTUAL_ENV", "TMPDIR", "TEMP", "PYTHONPATH", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    return dict(env, PATH=path, MODEL_CONFIG="test-vit-config.yaml", SAM_CHECKPOINT=str(checkpoint),
                XDG_STATE_HOME=str(state))  # fmt: skip


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_readme_first_run_beside_another_torchserve(fresh_clone, other_torchserve, random_checkpoint, tmp_path):
    env = new_shell_env(fresh_clone, random_checkpoint, tmp_path / "state")
    serve_block = readme_block("The two commands")
    assert INSTALL_LINE in serve_block and "make serve" in serve_block
    serve_lines = "\n".join(line for line in serve_block.splitlines() if not line.startswith(INSTALL_LINE))

    started = bash(serve_lines, fresh_clone, env)
    output = started.stdout + started.stderr
    # The other server holds gRPC's 7070: the message names it and what to type instead.
    assert started.returncode != 0, output
    grpc = read_ports((REPO / "config.properties").read_text())["grpc_inference"]
    assert f"{grpc} (grpc_inference)" in output and "Traceback" not in output, output
    port = re.search(r"add PORT=(\d+) to the make command", output).group(1)
    started = bash(serve_lines.replace("make serve", f"make serve PORT={port}"), fresh_clone, env)
    output = started.stdout + started.stderr
    env["SAM_FAST_URL"] = f"http://127.0.0.1:{port}"
    try:
        assert started.returncode == 0, output
        assert "TorchServe is running" in started.stdout and "make stop" in started.stdout

        client_block = readme_block("First client run")
        assert client_block.startswith(". .venv/bin/activate")
        ran = bash(client_block, fresh_clone, env)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert (fresh_clone / "out" / "astronaut.json").is_file()
        assert (fresh_clone / "out" / "astronaut.overlay.png").is_file()
        assert (fresh_clone / "results" / "coco.json").is_file()
        assert (fresh_clone / "results" / "astronaut.labels.png").is_file()

        # From any other folder the client finds the token of the server make serve started.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        sample = fresh_clone / "samples" / "astronaut.jpg"
        away = bash(f"{fresh_clone}/.venv/bin/sam-fast-client {sample} --out out", elsewhere, env)
        assert away.returncode == 0, away.stdout + away.stderr
        assert (elsewhere / "out" / "astronaut.json").is_file()
    finally:
        stopped = bash("make stop", fresh_clone, env)
    assert stopped.returncode == 0 and "TorchServe stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    # make stop stopped this checkout's server and not the other one.
    assert other_torchserve.poll() is None
    assert busy(read_ports((fresh_clone / "run" / "config.properties").read_text())) == {}


def test_make_smoke_says_its_masks_are_meaningless(fresh_clone, other_torchserve, tmp_path):
    """`make smoke` (random full-size vit_b, the smoke config) beside the other server: the banner
    before and after, and on every overlay."""
    env = new_shell_env(fresh_clone, Path("unused.pth"), tmp_path / "state")
    env.pop("MODEL_CONFIG"), env.pop("SAM_CHECKPOINT")
    port = free_server_port()
    ran = bash(f"make smoke PORT={port}", fresh_clone, env, timeout=900)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    banner = "*** SMOKE TEST: random weights, the masks are meaningless ***"
    assert ran.stdout.count(banner) == 2 and ran.stdout.rstrip().endswith(banner)
    overlays = sorted((fresh_clone / "out" / "smoke").glob("*.overlay.png"))
    assert [p.name for p in overlays] == ["astronaut.overlay.png", "chelsea.overlay.png"]
    for overlay in overlays:
        band = np.asarray(Image.open(overlay).convert("RGB"))[:12]
        # A band of one colour with the text's pixels in another across the top.
        assert len(np.unique(band.reshape(-1, 3), axis=0)) >= 2 and (band == band[0, 0]).all(axis=-1).mean() > 0.5
    assert RunFolder(fresh_clone / "run").pid() is None  # smoke stops its server
