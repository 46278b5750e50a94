"""Test and benchmark tooling (not shipped): a real TorchServe on 127.0.0.1 in a directory of its own (tests and benchmarks): started from
a real archive with the repo's config.properties (ports swapped for free ones), stopped in every case."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from sam_fast_serve.endpoint import MODEL_NAME, read_token, wait_until_ready

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServe:
    """TorchServe with the repo's config.properties (ports swapped for free ones) in `workdir`."""

    def __init__(self, workdir: Path, model_store: Path, archive_name: str, extra_properties: str = "") -> None:
        self.workdir = workdir
        self.ports = {"inference": free_port(), "management": free_port(), "metrics": free_port()}
        properties = (REPO / "config.properties").read_text()
        for api, port in self.ports.items():
            properties = re.sub(
                rf"^{api}_address=http://127\.0\.0\.1:\d+",
                f"{api}_address=http://127.0.0.1:{port}",
                properties,
                flags=re.M,
            )
        properties = re.sub(r"^model_store=.*$", f"model_store={model_store}", properties, flags=re.M)
        self.config = workdir / "config.properties"
        self.config.write_text(properties + extra_properties)
        self.archive_name = archive_name
        self.process: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def token(self, api: str = "inference") -> str:
        return read_token(self.key_file, api)

    def auth(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(api)}"}

    def start(self, timeout: float = 300) -> float:
        """Start and wait until the model is READY; returns the seconds that took."""
        env = dict(os.environ, LOG_LOCATION=str(self.workdir / "logs"), METRICS_LOCATION=str(self.workdir / "logs"))
        self.process = subprocess.Popen(
            [
                str(BIN / "torchserve"),
                "--start",
                "--foreground",
                "--ncs",
                "--ts-config",
                str(self.config),
                "--models",
                f"{MODEL_NAME}={self.archive_name}",
            ],
            cwd=self.workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return wait_until_ready(self.management_url, MODEL_NAME, self.key_file, timeout)
        except TimeoutError:
            self.stop()
            raise

    def worker_pids(self):
        reply = requests.get(f"{self.management_url}/models/{MODEL_NAME}", headers=self.auth("management"), timeout=10)
        return [w["pid"] for w in reply.json()[0]["workers"]]

    def model_log(self) -> str:
        path = self.workdir / "logs" / "model_log.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop the frontend and its workers (one process group), forcefully if they linger."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process = None


class RedisServer:
    """Debian's redis-server on a free loopback port in `workdir`, no persistence, bounded memory
    (oldest-used keys evicted); stop() and start() again keep the port, as a restarted Redis would."""

    def __init__(self, workdir: Path, maxmemory: str = "64mb") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.maxmemory = maxmemory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None
