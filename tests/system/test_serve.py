"""`sam-fast-serve start`, `stop` and `wait-ready` (what `make serve` and `make stop` run), with real
TorchServes on 127.0.0.1: two side by side, each from its run folder, and stopped one at a time; a
start that cannot succeed says why at once, naming the log."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from harness.archives import smoke_archive
from harness.servers import REPO, free_server_port
from sam_fast_serve.common.endpoint import MODEL_NAME, read_token, recorded_key_file
from sam_fast_serve.tools.torchserve import PID_FILE, RunFolder, busy, moved, read_ports

SERVE = str(Path(sys.executable).parent / "sam-fast-serve")
SHIPPED_PORTS = read_ports((REPO / "config.properties").read_text())


def worker_pids(run: RunFolder) -> list[int]:
    """The pids of the workers of the TorchServe of `run` (their sockets are in its tmp/)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if str(run.tmp.absolute()).encode() in (proc / "cmdline").read_bytes() and int(proc.name) != run.pid():
                found.append(int(proc.name))
    return found


def serve(folder: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """`sam-fast-serve ARGS` run from `folder` (where TorchServe writes its key file)."""
    return subprocess.run(
        [SERVE, *args], cwd=folder, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
    )


def start(folder: Path, archive: Path, port: int, **kwargs):
    return serve(
        folder,
        "start",
        "--run-dir", "run",
        "--ts-config", str(REPO / "config.properties"),
        "--model-store", str(archive.parent),
        "--models", f"{MODEL_NAME}={archive.name}",
        "--port", str(port),
        "--timeout", "300",
        **kwargs,
    )  # fmt: skip


def answers(port: int, token: str) -> bool:
    """Whether the inference API on `port` segments the sample photo with `token`."""
    headers = {"Authorization": f"Bearer {token}"}
    body = (REPO / "samples" / "astronaut.jpg").read_bytes()
    try:
        reply = requests.post(
            f"http://127.0.0.1:{port}/predictions/{MODEL_NAME}", data=body, headers=headers, timeout=120
        )
    except requests.ConnectionError:
        return False
    return reply.status_code == 200


@pytest.fixture(scope="module")
def archive(tmp_path_factory, random_checkpoint) -> Path:
    return smoke_archive(tmp_path_factory.mktemp("archive"), random_checkpoint)


@pytest.fixture
def state_home(tmp_path, monkeypatch) -> Path:
    """A state folder of this test's own, where `start` records its server for the client."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def test_two_servers_side_by_side_and_stop_one(tmp_path, archive, state_home):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    ports = [free_server_port()]
    started = [start(first, archive, ports[0])]
    ports.append(free_server_port())
    started.append(start(second, archive, ports[1]))
    try:
        for ran, port in zip(started, ports):
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert f"TorchServe is running: http://127.0.0.1:{port}/predictions/{MODEL_NAME}" in ran.stdout
        # Each has its own pid file, temp files and config with all five ports moved.
        for folder, port in ((first, ports[0]), (second, ports[1])):
            run = RunFolder(folder / "run")
            assert run.pid() is not None and (run.tmp / PID_FILE).is_file()
            assert read_ports(run.config.read_text()) == moved(SHIPPED_PORTS, port)
            assert recorded_key_file(f"http://127.0.0.1:{port}") == folder / "key_file.json"
        tokens = [read_token(folder / "key_file.json", "inference") for folder in (first, second)]
        assert answers(ports[0], tokens[0]) and answers(ports[1], tokens[1])

        stopped = serve(second, "stop", "--run-dir", "run")
        assert stopped.returncode == 0 and "TorchServe stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        assert not answers(ports[1], tokens[1])
        assert busy(moved(SHIPPED_PORTS, ports[1])) == {}
        assert recorded_key_file(f"http://127.0.0.1:{ports[1]}") is None
        # The other one was left alone.
        assert answers(ports[0], tokens[0])
        again = serve(second, "stop", "--run-dir", "run")
        assert again.returncode == 0 and "no TorchServe runs from run" in again.stdout
    finally:
        for folder in (first, second):
            serve(folder, "stop", "--run-dir", "run")
    assert busy(moved(SHIPPED_PORTS, ports[0])) == {}


def test_a_port_in_use_is_named_at_once(tmp_path, archive, state_home):
    port = free_server_port()
    grpc = moved(SHIPPED_PORTS, port)["grpc_inference"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc))
        taken.listen()
        began = time.monotonic()
        ran = start(tmp_path, archive, port)
    assert ran.returncode == 1
    assert f"in use on 127.0.0.1 (another TorchServe or program listens there): {grpc} (grpc_inference)" in ran.stderr
    assert re.search(r"all five are free with --port (\d+): add PORT=\1 to the make command", ran.stderr)
    assert time.monotonic() - began < 30  # no wait for a server that cannot start
    assert RunFolder(tmp_path / "run").pid() is None


def test_a_model_that_fails_to_load_is_reported_and_stopped(tmp_path, state_home):
    broken = tmp_path / "weights" / "random_test_vit.pth"
    broken.parent.mkdir()
    broken.write_bytes(b"not a checkpoint")
    archive = smoke_archive(tmp_path, broken)
    port = free_server_port()
    began = time.monotonic()
    ran = start(tmp_path, archive, port)
    assert ran.returncode == 1
    assert "the model failed to load: the worker died (_pickle.UnpicklingError: Weights only load failed" in ran.stderr
    assert "run/logs/model_log.log" in ran.stderr
    assert time.monotonic() - began < 120  # it gave up at the first death, not after --timeout
    assert RunFolder(tmp_path / "run").pid() is None and busy(moved(SHIPPED_PORTS, port)) == {}


def test_java_missing_is_said(tmp_path, archive, state_home):
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | {"PATH": str(tmp_path / "empty")}
    ran = start(tmp_path, archive, free_server_port(), env=env)
    assert ran.returncode == 1 and "Java is not installed" in ran.stderr and "openjdk" in ran.stderr


def test_wait_ready_gives_up_when_the_server_exits(tmp_path, archive, state_home):
    port = free_server_port()
    assert start(tmp_path, archive, port).returncode == 0
    run = RunFolder(tmp_path / "run")
    workers = worker_pids(run)
    os.kill(run.pid(), signal.SIGKILL)
    # The management URL and key file come from the run folder's state.
    waited = serve(tmp_path, "wait-ready", "--run-dir", "run", "--timeout", "300", timeout=60)
    for pid in workers:  # orphans of the killed frontend
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert waited.returncode == 1 and "TorchServe exited" in waited.stderr, waited.stderr
    assert "run/logs/ts_log.log" in waited.stderr


def test_what_cannot_start_is_said_before_starting(tmp_path, archive, state_home):
    """A missing archive (TorchServe would only log it and serve nothing), and a second server of
    one folder (both would write its key_file.json) are refused at once."""
    missing = start(tmp_path, archive.parent / "none.tar.gz", free_server_port())
    assert missing.returncode == 1 and f"no archive {archive.parent / 'none.tar.gz'}" in missing.stderr
    assert "make archive" in missing.stderr

    first = start(tmp_path, archive, free_server_port())
    try:
        assert first.returncode == 0, first.stderr
        second = serve(
            tmp_path, "start", "--run-dir", "run2", "--ts-config", str(REPO / "config.properties"),
            "--model-store", str(archive.parent), "--models", f"{MODEL_NAME}={archive.name}",
            "--port", str(free_server_port()),
        )  # fmt: skip
        assert second.returncode == 1
        assert f"writes its tokens to {tmp_path / 'key_file.json'} already" in second.stderr, second.stderr
        again = start(tmp_path, archive, RunFolder(tmp_path / "run").state()["ports"]["inference"])
        assert again.returncode == 0 and "running already" in again.stdout
    finally:
        serve(tmp_path, "stop", "--run-dir", "run")
    # Stopped: its state and record are gone, so the gateway is not put in front of a dead server.
    assert RunFolder(tmp_path / "run").state() is None
    team = serve(tmp_path, "team", "--listen", "127.0.0.1:1", "--run-dir", "run")
    assert team.returncode == 1 and "no TorchServe was started from run" in team.stderr
