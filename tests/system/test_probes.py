"""The Kubernetes pod, minus Kubernetes: the exact probe commands of deploy/kubernetes/deployment.yaml
and the pod's gateway (deploy/kubernetes/gateway.conf, Debian's nginx with njs) against a real
TorchServe through its life: not started, started without the model, loading, READY, restarted
with new keys, stopped. Only paths and ports are changed from the shipped files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import BIN, REPO, LocalService, TorchServe
from sam_fast_serve.common.endpoint import MODEL_NAME

KUBE = REPO / "deploy" / "kubernetes"
POD_KEY_FILE = "/home/model-server/run/key_file.json"
TOKEN = "a-shared-token-0123456789"


class PodGateway(LocalService):
    """gateway.conf as shipped, its paths in `workdir`, in front of `server`."""

    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path, server: TorchServe) -> None:
        super().__init__(workdir)
        conf = (KUBE / "gateway.conf").read_text()
        for old, new in [
            ("/tmp/", f"{workdir}/"),
            ("listen 8000;", f"listen 127.0.0.1:{self.port};"),
            ("server 127.0.0.1:8080;", f"server 127.0.0.1:{server.ports['inference']};"),
            ("js_path /etc/sam-fast-gateway;", f"js_path {KUBE};"),
            ("/etc/sam-fast-token/token", str(workdir / "token")),
            (POD_KEY_FILE, str(server.key_file)),
            ("daemon off;", "daemon off;\nuser root;"),  # in the pod: the key file's owner
        ]:
            assert old in conf, f"gateway.conf no longer has {old!r}"
            conf = conf.replace(old, new)
        self.config = workdir / "gateway.conf"
        self.config.write_text(conf)
        (workdir / "token").write_text(TOKEN + "\n")  # a Secret's file may end in a newline

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return ["nginx", "-e", "stderr", "-p", str(self.workdir), "-c", str(self.config)]

    def ready(self) -> bool:
        return requests.get(f"{self.url}/gateway-health", timeout=2).status_code == 200


def probe_commands(server: TorchServe) -> dict[str, list[str]]:
    """Each probe's exec command from deployment.yaml, pointed at `server`."""
    (deployment,) = yaml.safe_load_all((KUBE / "deployment.yaml").read_text())
    (torchserve,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "torchserve"]
    swaps = {
        POD_KEY_FILE: str(server.key_file),
        "http://127.0.0.1:8080": server.inference_url,
        "http://127.0.0.1:8081": server.management_url,
    }
    commands = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = torchserve[probe]["exec"]["command"]
        program = {"python": sys.executable, "sam-fast-serve": str(BIN / "sam-fast-serve")}[command[0]]
        arguments = []
        for argument in command[1:]:
            for old, new in swaps.items():
                argument = argument.replace(old, new)
            arguments.append(argument)
        commands[probe] = [program, *arguments]
    return commands


def passes(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=60).returncode == 0


def model_ready(server: TorchServe) -> bool:
    reply = requests.get(f"{server.management_url}/models/{MODEL_NAME}", headers=server.auth("management"), timeout=10)
    return reply.ok and any(w["status"] == "READY" for w in reply.json()[0]["workers"])


def inference_requests(server: TorchServe) -> float:
    return server.metric("ts_inference_requests_total") or 0.0


def until(check, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{check} did not hold within {timeout} s"
        time.sleep(0.5)


@pytest.fixture
def pod(tmp_path, random_checkpoint):
    """A TorchServe not yet launched (no model at start, as if its loading were slow) and the gateway."""
    archive = smoke_archive(tmp_path, random_checkpoint)
    (tmp_path / "torchserve").mkdir()
    (tmp_path / "gateway").mkdir()
    # The model API (off in the shipped config) registers the model later, holding "started, not loaded".
    server = TorchServe(tmp_path / "torchserve", archive.parent, {}, "enable_model_api=true\n")
    gateway = PodGateway(tmp_path / "gateway", server)
    gateway.start()
    try:
        yield server, gateway, archive.name
    finally:
        gateway.stop()
        server.stop()


def register(server: TorchServe, archive: str) -> None:
    reply = requests.post(
        f"{server.management_url}/models",
        params={"url": archive, "model_name": MODEL_NAME, "initial_workers": 1, "synchronous": "false"},
        headers=server.auth("management"),
        timeout=30,
    )
    assert reply.status_code == 202, reply.text


def test_probes_and_gateway_through_a_torchserve_life(pod, chelsea):
    server, gateway, archive = pod
    probes = probe_commands(server)
    good = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    url = gateway.url + f"/predictions/{MODEL_NAME}"

    # Not started: every probe fails; the gateway says 503 (retry), never 502.
    assert not any(passes(command) for command in probes.values())
    assert requests.post(url, data=b"x", headers=good, timeout=30).status_code == 503
    assert requests.get(gateway.url + "/ping", timeout=30).status_code == 503

    # Started, the model not loaded: alive (its /ping is healthy), not ready.
    server.launch()
    until(lambda: passes(probes["startupProbe"]), timeout=120)
    assert passes(probes["livenessProbe"])
    assert not passes(probes["readinessProbe"])
    # Why the liveness probe sends a token: TorchServe 0.12's /ping refuses a request without one.
    assert requests.get(server.inference_url + "/ping", timeout=10).status_code == 400

    # Loading, then READY: the readiness probe passes only once the model has a READY worker.
    register(server, archive)
    until(lambda: passes(probes["readinessProbe"]))
    assert model_ready(server)
    assert passes(probes["livenessProbe"])

    # The gateway: the shared token in, the pod's own key out; anything else never reaches TorchServe.
    answer = requests.post(url, data=encode(chelsea), headers={**good, "Accept": "application/json"}, timeout=300)
    assert answer.status_code == 200 and len(answer.json()) == 48
    before = inference_requests(server)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        refused = requests.post(url, data=encode(chelsea), headers=headers, timeout=30)
        assert refused.status_code == 401 and "token" in refused.json()["message"]
    time.sleep(1)
    assert inference_requests(server) == before
    assert requests.get(gateway.url + "/ping", timeout=30).status_code == 200

    # Restarted: new keys, picked up by the gateway at the next request without a reload.
    old_keys = server.key_file.read_text()
    server.stop()
    assert requests.post(url, data=b"x", headers=good, timeout=30).status_code == 503
    assert not passes(probes["livenessProbe"]) and not passes(probes["readinessProbe"])
    server.launch()
    until(
        lambda: server.key_file.exists() and server.key_file.read_text() != old_keys and passes(probes["startupProbe"])
    )
    register(server, archive)
    until(lambda: passes(probes["readinessProbe"]))
    assert requests.post(url, data=encode(chelsea), headers=good, timeout=300).status_code == 200

    # A placeholder token locks the gateway.
    (gateway.workdir / "token").write_text("CHANGE_ME")
    assert requests.post(url, data=b"x", headers={"Authorization": "Bearer CHANGE_ME"}, timeout=30).status_code == 401
