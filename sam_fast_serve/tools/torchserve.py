"""TorchServe started, watched and stopped from a run folder of its own.

TorchServe's launcher keeps one pid file in the temp folder ($TMPDIR), its frontend unpacks archives
and opens worker sockets in java.io.tmpdir ($TEMP), and its five listeners (inference, management,
metrics, gRPC inference, gRPC management) default to the same numbers everywhere: two servers on one
machine meet on all of these unless each has its own. A run folder holds one server's temp folder,
logs, config and state, so `sam-fast-serve stop` stops that server and no other.

    RUN/config.properties   the config it runs, every port set
    RUN/tmp/                $TMPDIR and $TEMP: the pid file, unpacked archives, worker sockets
    RUN/logs/               console.log (the launcher's output) and TorchServe's own logs
    RUN/server.json         its URLs, key file and models, for the commands that come later

Standard library only (and requests): `wait-ready` runs from a client install too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sam_fast_serve.common.endpoint import (
    KEY_FILE,
    forget_server,
    record_server,
    recorded_servers,
    wait_until_ready,
)

# Each listener's key in config.properties, in the order `--port` moves them.
PORT_KEYS = {
    "inference": "inference_address",
    "management": "management_address",
    "metrics": "metrics_address",
    "grpc_inference": "grpc_inference_port",
    "grpc_management": "grpc_management_port",
}
PID_FILE = ".model_server.pid"
# What run/server.json holds.
STATE_KEYS = {"inference_url", "management_url", "metrics_url", "key_file", "models", "ports"}
# How often wait-ready says what it waits for.
PROGRESS_SECONDS = 10.0


class StartError(Exception):
    """TorchServe did not start, or its model did not load; the message says why and where the log is."""


def read_ports(properties: str) -> dict[str, int]:
    """The five listeners' ports a config.properties text sets. Raises StartError for one it leaves
    to TorchServe's default (a second server would meet the first on it)."""
    ports = {}
    for name, key in PORT_KEYS.items():
        found = re.search(rf"^{key}=(?:\S*:)?(\d+)\s*$", properties, re.M)
        if found is None:
            raise StartError(f"config.properties sets no {key}: set every port, or two servers meet on the default")
        ports[name] = int(found.group(1))
    return ports


def with_ports(properties: str, ports: Mapping[str, int]) -> str:
    """`properties` with the listeners of `ports` ({name: port}, names of PORT_KEYS) moved there."""
    for name, port in ports.items():
        key = PORT_KEYS[name]
        properties, count = re.subn(rf"^({key}=(?:\S*:)?)\d+\s*$", rf"\g<1>{port}", properties, flags=re.M)
        if count != 1:
            raise StartError(f"config.properties sets {key} {count} times, not once")
    return properties


def moved(ports: Mapping[str, int], inference_port: int) -> dict[str, int]:
    """Every port moved by as much as the inference port moves to `inference_port`. Raises
    StartError when one would leave 1..65535."""
    shift = inference_port - ports["inference"]
    result = {name: port + shift for name, port in ports.items()}
    outside = {name: port for name, port in result.items() if not 0 < port < 65536}
    if outside:
        raise StartError(f"--port {inference_port} moves ports out of 1..65535: {outside}")
    return result


def busy(ports: Mapping[str, int]) -> dict[str, int]:
    """The ports of `ports` something listens on already (on 127.0.0.1 or every address)."""
    taken = {}
    for name, port in ports.items():
        with socket.socket() as probe:
            # A port with connections in TIME_WAIT from a server just stopped is free for a listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken[name] = port
    return taken


def free_inference_port(ports: Mapping[str, int], step: int = 100, tries: int = 50) -> int | None:
    """An inference port, in steps of `step` above the configured one, where every port is free."""
    for n in range(1, tries + 1):
        candidate = ports["inference"] + n * step
        try:
            if not busy(moved(ports, candidate)):
                return candidate
        except StartError:
            return None
    return None


@dataclass(frozen=True)
class RunFolder:
    """One TorchServe's own folder (see the module's docstring)."""

    path: Path

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def config(self) -> Path:
        return self.path / "config.properties"

    @property
    def state_file(self) -> Path:
        return self.path / "server.json"

    @property
    def console_log(self) -> Path:
        return self.logs / "console.log"

    @property
    def frontend_log(self) -> Path:
        return self.logs / "ts_log.log"

    @property
    def worker_log(self) -> Path:
        return self.logs / "model_log.log"

    def log_paths(self) -> str:
        return f"logs: {self.console_log}, {self.frontend_log}, {self.worker_log}"

    def environment(self, base: Mapping[str, str] = os.environ) -> dict[str, str]:
        """`base` with TorchServe's temp folders and logs in this folder (absolute: the workers
        start elsewhere)."""
        tmp, logs = str(self.tmp.absolute()), str(self.logs.absolute())
        return dict(base, TMPDIR=tmp, TEMP=tmp, LOG_LOCATION=logs, METRICS_LOCATION=logs)

    def prepare(self, properties: str) -> None:
        """Make the folders, emptied of an earlier start's files (the frontend unpacks every archive
        into tmp/ and never removes it; the logs are read for this start's failures), and write the
        config this server runs."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()
        self.config.write_text(properties)

    def pid(self) -> int | None:
        """The frontend's pid from this folder's pid file, while that process is a TorchServe."""
        try:
            pid = int((self.tmp / PID_FILE).read_text().split()[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if b"org.pytorch.serve.ModelServer" in command else None

    def state(self) -> dict | None:
        """What `start` wrote of the server (STATE_KEYS); None when there is none, or not that."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and STATE_KEYS <= state.keys() else None

    def failure(self) -> str | None:
        """Why this server failed to start or load its model, read from its logs; None when they say
        nothing of a failure."""
        return failure_reason(
            _read(self.console_log), _read(self.logs / "ts_log.log"), _read(self.logs / "model_log.log")
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# What the launcher or the frontend says when it cannot start, and what to tell the user instead.
START_FAILURES = (
    (re.compile(r"TorchServe is already running"), "another TorchServe lists itself in this run folder's pid file"),
    (re.compile(r"Failed to bind to address:? (\S+)"), "{0} is in use: another server listens there"),
    (re.compile(r"java not found|java: (?:command )?not found"), "Java is not installed (or JAVA_HOME is wrong)"),
    (re.compile(r"^Exception in thread \S+ ([^\n]+)", re.M), "TorchServe stopped: {0}"),
)
# A Python exception's last line as the worker printed it to model_log.log.
WORKER_EXCEPTION = re.compile(r"MODEL_LOG - ((?:[\w.]+\.)?\w*(?:Error|Exception)\w*: .+)$", re.M)


def failure_reason(console: str, frontend: str, worker: str) -> str | None:
    """The reason a TorchServe failed, from its launcher's output (`console`), its frontend's log
    (ts_log.log) and its workers' (model_log.log); None when none of them tells of a failure."""
    for pattern, reason in START_FAILURES:
        found = pattern.search(console) or pattern.search(frontend)
        if found:
            return reason.format(*found.groups())
    if "Backend worker process died" in worker or "Backend worker process died" in frontend:
        exceptions = WORKER_EXCEPTION.findall(worker)
        said = exceptions[-1] if exceptions else "no exception in model_log.log (killed, or out of memory?)"
        return f"the model failed to load: the worker died ({said})"
    return None


def _java() -> str | None:
    """The java the launcher runs: $JAVA_HOME/bin/java when JAVA_HOME is set, else the PATH's."""
    if os.environ.get("JAVA_HOME"):
        java = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        return str(java) if os.access(java, os.X_OK) else None
    return shutil.which("java")


def _check_can_start(model_store: Path, models: Mapping[str, str], key_file: Path) -> None:
    """Raise StartError for what would make a start fail or wait in vain: no Java, an archive that
    is not there (TorchServe only logs it and serves nothing), or a key file in this folder that a
    running server of another run folder writes to (TorchServe writes key_file.json where it starts)."""
    if _java() is None:
        where = "$JAVA_HOME/bin/java" if os.environ.get("JAVA_HOME") else "java on PATH"
        raise StartError(f"Java is not installed ({where} not found): TorchServe's frontend needs Java 11 or "
                         "newer (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")  # fmt: skip
    missing = [str(model_store / archive) for archive in models.values() if not (model_store / archive).is_file()]
    if missing:
        raise StartError(f"no archive {', '.join(missing)}: build it first (make archive, or sam-fast-serve archive)")
    for url, recorded in recorded_servers().items():
        if recorded == key_file and busy({"inference": urlsplit(url).port or 80}):
            raise StartError(
                f"the TorchServe at {url} writes its tokens to {key_file} already: start this one from another folder"
            )


def start(
    run: RunFolder,
    ts_config: Path,
    model_store: Path,
    models: Mapping[str, str],
    inference_port: int | None = None,
    timeout: float = 600,
    say: Callable[[str], None] = print,
) -> dict:
    """Start TorchServe from `run` with `ts_config` (every port moved so the inference port is
    `inference_port`, when given), serving `models` ({name: archive} in `model_store`), and wait
    until each model is READY. The key file is written to the working directory, as TorchServe does.
    Returns the server's state (also in run/server.json). Raises StartError with the reason; a server
    that started but could not load its model is stopped first."""
    try:
        properties = ts_config.read_text()
    except OSError as exc:
        raise StartError(f"cannot read TorchServe's config {ts_config}: {exc.strerror}") from None
    ports = read_ports(properties)
    if inference_port is not None:
        ports = moved(ports, inference_port)
    key_file = Path.cwd() / KEY_FILE
    pid = run.pid()
    if pid is not None:
        state = run.state() or {}
        if state.get("models") == dict(models) and state.get("ports") == ports:
            say(f"TorchServe of {run.path} is running already (pid {pid})")
            return state
        raise StartError(
            f"TorchServe of {run.path} is running already (pid {pid}) with other models or ports "
            f"({state.get('models')}, {state.get('inference_url')}): stop it first (make stop, or "
            f"sam-fast-serve stop --run-dir {run.path})"
        )
    _check_can_start(model_store, models, key_file)
    taken = busy(ports)
    if taken:
        listed = ", ".join(f"{port} ({name})" for name, port in taken.items())
        alternative = free_inference_port(ports)
        hint = (
            f"; all five are free with --port {alternative}: add PORT={alternative} to the make command"
            if alternative
            else ""
        )
        raise StartError(f"in use on 127.0.0.1 (another TorchServe or program listens there): {listed}{hint}")
    run.prepare(with_ports(properties, ports))
    with run.console_log.open("w") as console:
        launched = subprocess.run(
            [str(Path(sys.executable).parent / "torchserve"), "--start", "--ncs", "--ts-config", str(run.config),
             "--model-store", str(model_store), "--models", *(f"{n}={a}" for n, a in models.items())],
            env=run.environment(), stdout=console, stderr=subprocess.STDOUT, timeout=120,
        )  # fmt: skip
    if launched.returncode != 0:
        raise StartError(f"{run.failure() or 'TorchServe did not start'}\n  {run.log_paths()}")
    state = {
        "inference_url": f"http://127.0.0.1:{ports['inference']}",
        "management_url": f"http://127.0.0.1:{ports['management']}",
        "metrics_url": f"http://127.0.0.1:{ports['metrics']}",
        "key_file": str(key_file),
        "models": dict(models),
        "ports": ports,
    }
    run.state_file.write_text(json.dumps(state, indent=2) + "\n")
    try:
        for name in models:
            wait_ready(run, state["management_url"], name, key_file, timeout, say)
    except StartError:
        stop(run)
        raise
    record_server(state["inference_url"], key_file)
    return state


def wait_ready(
    run: RunFolder | None,
    management_url: str,
    model: str,
    key_file: Path,
    timeout: float,
    say: Callable[[str], None] = print,
) -> float:
    """Wait until `model` has a READY worker, saying every PROGRESS_SECONDS how long it has waited;
    with the server's `run` folder, give up as soon as it has exited or its model failed to load.
    Returns the seconds waited; raises StartError."""
    started = time.monotonic()
    last_said = started

    def failed() -> str | None:
        nonlocal last_said
        now = time.monotonic()
        if now - last_said >= PROGRESS_SECONDS:
            say(f"waiting for {model} to be READY: {now - started:.0f} s")
            last_said = now
        if run is None:
            return None
        if run.pid() is None:
            return run.failure() or "TorchServe exited"
        return run.failure()

    where = run.log_paths() if run is not None else "logs: logs/ of the folder TorchServe was started from"
    try:
        return wait_until_ready(management_url, model, key_file, timeout, failed)
    except (TimeoutError, RuntimeError) as exc:
        raise StartError(f"{exc}\n  {where}") from None


def stop(run: RunFolder, timeout: float = 60) -> int | None:
    """Stop the TorchServe of `run` and no other; returns its pid, None when none ran from there.
    Its record for the client and its state go with it, and so does its key file (TorchServe's
    --stop removes key_file.json from the folder it runs in: the server's own)."""
    pid = run.pid()
    if pid is None:
        return None
    state = run.state()
    subprocess.run(
        [str(Path(sys.executable).parent / "torchserve"), "--stop"],
        env=run.environment(), capture_output=True, timeout=timeout,
        cwd=Path(state["key_file"]).parent if state else None,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if state is not None:
        forget_server(state["inference_url"])
    run.state_file.unlink(missing_ok=True)
    return pid
