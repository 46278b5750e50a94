"""Real servers for tests and benchmarks (not shipped), on 127.0.0.1: a TorchServe in a directory of
its own, started from a real archive with the repo's config.properties (ports swapped for free
ones), and Debian's Redis, Prometheus and nginx balancer; each stopped in every case."""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from sam_fast_serve.common.endpoint import MODEL_NAME, read_token, wait_until_ready
from sam_fast_serve.tools.torchserve import RunFolder, busy, moved, read_ports, with_ports

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


_ports = random.Random()
_ports_given: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now and not handed out before in this process. Taken below
    the kernel's ephemeral range: a port from a bind to port 0 may be handed out again by the next such
    bind, or taken by an outgoing connection, before the server it was meant for binds it (two
    TorchServes and a balancer start over a minute, with thousands of connections meanwhile)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = _ports.randrange(10000, ephemeral_low)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port


def free_server_port(tries: int = 1000) -> int:
    """A port for `sam-fast-serve start --port` (make serve PORT=): one where all five ports of the
    shipped config.properties, moved with it, are free (and above 1024)."""
    shipped = read_ports((REPO / "config.properties").read_text())
    for _ in range(tries):
        port = free_port()
        if port - shipped["inference"] + min(shipped.values()) > 1024 and not busy(moved(shipped, port)):
            return port
    raise RuntimeError(f"no port found in {tries} tries whose five moved ports are all free")


def sample_sum(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of metric `name` in Prometheus text `text` whose labels include
    `labels`; None when no sample matches."""
    values = [
        float(value)
        for sample_labels, value in re.findall(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", text, re.M)
        if labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', sample_labels)).items()
    ]
    return sum(values) if values else None


class TorchServe:
    """TorchServe with the repo's config.properties (all five ports swapped for free ones) in
    `workdir`, its run folder (sam_fast_serve.tools.torchserve: pid file, temp files and logs of its
    own), serving `models` ({name: archive file name} in `model_store`; a str is the archive of
    MODEL_NAME). Several run side by side, and beside a server `make serve` started."""

    def __init__(
        self,
        workdir: Path,
        model_store: Path,
        models: str | dict[str, str],
        extra_properties: str = "",
        environment: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.environment = environment or {}
        self.run = RunFolder(workdir)
        properties = (REPO / "config.properties").read_text()
        self.ports = {name: free_port() for name in read_ports(properties)}
        properties = with_ports(properties, self.ports)
        properties = re.sub(r"^model_store=.*$", f"model_store={model_store}", properties, flags=re.M)
        self.run.prepare(properties + extra_properties)
        self.config = self.run.config
        self.models = {MODEL_NAME: models} if isinstance(models, str) else models
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
        """Start and wait until every model is READY; returns the seconds that took. Raises
        TimeoutError, or RuntimeError with the reason as soon as its logs tell of a failure."""
        self.launch()
        try:
            return max(
                wait_until_ready(self.management_url, name, self.key_file, timeout, self.run.failure)
                for name in self.models
            )
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    def launch(self) -> None:
        """Start the frontend (it loads the models in the background)."""
        env = self.run.environment(dict(os.environ, **self.environment))
        self.process = subprocess.Popen(
            [
                str(BIN / "torchserve"),
                "--start",
                "--foreground",
                "--ncs",
                "--ts-config",
                str(self.config),
                *(["--models", *(f"{name}={archive}" for name, archive in self.models.items())] if self.models else []),
            ],
            cwd=self.workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def worker_pids(self):
        reply = requests.get(f"{self.management_url}/models/{MODEL_NAME}", headers=self.auth("management"), timeout=10)
        return [w["pid"] for w in reply.json()[0]["workers"]]

    def metrics_text(self) -> str:
        """What the metrics API serves now (Prometheus text format)."""
        return requests.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of metric `name` on the metrics API whose labels include
        `labels` (e.g. status="200"); None when no sample matches."""
        return sample_sum(self.metrics_text(), name, **labels)

    def model_log(self) -> str:
        path = self.run.worker_log
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


class LocalService:
    """A Debian package's server on a free loopback port in `workdir`; stop() and start() again keep
    the port, as a restarted server would. Subclasses say how to run it and when it is ready."""

    # How stop() ends it: Redis is killed, as a crash would; nginx must tell its workers to go.
    stop_signal = signal.SIGKILL

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        command = self.command()
        log = self.workdir / f"{Path(command[0]).name}.log"
        with log.open("a") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.ready():
                    return
            except OSError:  # not listening yet (requests' ConnectionError is an OSError too)
                pass
            time.sleep(0.05)
        exit_code = self.process.poll()
        self.stop()
        said = log.read_text()[-2000:]
        raise TimeoutError(f"{command[0]} did not answer on port {self.port} (exit code {exit_code}); it said:\n{said}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self.process = None


class RedisServer(LocalService):
    """Debian's redis-server: no persistence, bounded memory (oldest-used keys evicted)."""

    def __init__(self, workdir: Path, maxmemory: str = "64mb") -> None:
        super().__init__(workdir)
        self.maxmemory = maxmemory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", str(self.workdir)]  # fmt: skip

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


class Prometheus(LocalService):
    """Debian's prometheus, scraping `targets` (host:port) every second; `query` asks its HTTP API."""

    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        super().__init__(workdir)
        self.config = workdir / "prometheus.yml"
        scrape = {"job_name": "torchserve", "scrape_interval": "1s", "static_configs": [{"targets": targets}]}
        self.config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip

    def ready(self) -> bool:
        return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def query(self, expression: str) -> list[dict]:
        """The instant vector of `expression` now: [{"metric": labels, "value": [time, "text"]}]."""
        reply = requests.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (expression, body)
        return body["data"]["result"]


class Balancer(LocalService):
    """Debian's nginx running deploy/nginx/balancer.conf in `workdir`: its ports swapped for free
    ones, its two replicas pointed at `replicas` (one TorchServe given twice: a single replica), its
    paths at `workdir` and the repo's files; clients send `token`."""

    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path, replicas: list[TorchServe], token: str) -> None:
        super().__init__(workdir)
        assert len(replicas) == 2
        (workdir / "token").write_text(token + "\n")
        self.log = workdir / "balancer.log"
        swaps = {
            "user sam-fast;": f"user {getpass.getuser()};",
            "/run/sam-fast-balancer.pid": str(workdir / "nginx.pid"),
            "/var/log/nginx/sam-fast-balancer.log": str(self.log),
            "js_path /etc/sam-fast;": f"js_path {REPO / 'deploy' / 'kubernetes'};",
            "/etc/sam-fast/replica.conf": str(REPO / "deploy" / "nginx" / "replica.conf"),
            "/etc/sam-fast/token": str(workdir / "token"),
            "127.0.0.1:8000;": f"127.0.0.1:{self.port};",
        }
        for n, replica in enumerate(replicas, start=1):
            swaps[f"127.0.0.1:910{n}"] = f"127.0.0.1:{free_port()}"  # the upstream entry and its server
            swaps[f"http://127.0.0.1:{8080 + 10 * (n - 1)};"] = f"{replica.inference_url};"
            swaps[f"/srv/sam-fast/replica-{n}/key_file.json"] = str(replica.key_file)
        conf = (REPO / "deploy" / "nginx" / "balancer.conf").read_text()
        for old, new in swaps.items():
            assert old in conf, old
            conf = conf.replace(old, new)
        self.config = workdir / "balancer.conf"
        self.config.write_text(conf)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return ["nginx", "-p", str(self.workdir), "-c", str(self.config), "-e", "stderr", "-g", "daemon off;"]

    def ready(self) -> bool:
        return requests.get(f"{self.url}/balancer-health", timeout=2).status_code == 200
