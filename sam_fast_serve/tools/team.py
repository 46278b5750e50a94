"""A team server: this host's TorchServe, whose listeners stay on loopback, reachable from other
machines through nginx with one stable shared token (deploy/nginx/team.conf with
deploy/kubernetes/gateway.js).

TorchServe 0.12 makes new keys at every start and cannot be given one, so laptops are given the team
token instead; the gateway checks it and passes each request on with TorchServe's current inference
key, read from its key_file.json. The token comes from an environment variable and is written only to
the gateway's folder (mode 600), which is never a checkout. It needs nothing beyond a client
install, which runs it too.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from sam_fast_serve.common.endpoint import state_home

TOKEN_ENV = "SAM_FAST_TEAM_TOKEN"
# gateway.js refuses shorter tokens (a test keeps the two equal): refusing here says why.
MIN_TOKEN_LENGTH = 16
HEALTH_PATH = "/team-health"
CONFIG_NAME = "team.conf"
TOKEN_NAME = "token"
PID_NAME = "nginx.pid"


class TeamError(Exception):
    """The team gateway cannot be set up or stopped; the message says why and what to do."""


def default_dir() -> Path:
    """Where the gateway keeps its config, token, pid and logs: $XDG_STATE_HOME/sam-fast-team, else
    ~/.local/state/sam-fast-team."""
    return state_home() / "sam-fast-team"


def team_token(environ: Mapping[str, str] = os.environ) -> str:
    """The shared token from $SAM_FAST_TEAM_TOKEN. Raises TeamError when it is unset or too short."""
    token = environ.get(TOKEN_ENV, "").strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise TeamError(
            f"set ${TOKEN_ENV} to the team's token ({MIN_TOKEN_LENGTH} characters or more, no spaces), e.g.\n"
            f"  export {TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\n"
            "and keep it: every laptop sends it, and the same value keeps working across restarts"
        )
    return token


def _host_port(text: str, what: str) -> tuple[str, int]:
    match = re.fullmatch(r"([\w.-]+):(\d{1,5})", text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise TeamError(f"{what} must be HOST:PORT (e.g. 0.0.0.0:8000), got {text!r}")
    return match.group(1), int(match.group(2))


def render_config(
    template: str, directory: Path, listen: str, inference_url: str, key_file: Path, gateway_js: Path
) -> str:
    """The nginx config of the gateway: `template` (deploy/nginx/team.conf) with its {{...}} fields
    filled. Paths are made absolute. Raises TeamError for a malformed address."""
    _host_port(listen, "--listen")
    url = urllib.parse.urlsplit(inference_url)
    if url.scheme != "http" or not url.hostname or url.port is None or url.path not in ("", "/"):
        raise TeamError(f"--inference-url must be TorchServe's http://HOST:PORT, got {inference_url!r}")
    key_file = key_file.resolve()
    # Run as root, nginx's workers would be "nobody", who cannot read key_file.json (TorchServe makes
    # it readable by its owner only): they run as that owner.
    user = f"user {pwd.getpwuid(key_file.stat().st_uid).pw_name};" if os.geteuid() == 0 else ""
    fields = {
        "user": user,
        "dir": str(directory.resolve()),
        "js_dir": str(gateway_js.resolve().parent),
        "js_file": gateway_js.name,
        "torchserve": f"{url.hostname}:{url.port}",
        "listen": listen,
        "key_file": str(key_file),
    }
    text = template
    for name, value in fields.items():
        text = text.replace("{{" + name + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise TeamError(f"the template has fields this command does not fill: {', '.join(sorted(set(left)))}")
    return text


def _nginx(nginx: str) -> str:
    # Debian installs nginx in /usr/sbin, which is not on every user's PATH.
    found = shutil.which(nginx) or shutil.which(nginx, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise TeamError(f"{nginx} not found: install nginx with its JavaScript module (Debian: "
                        "sudo apt-get install nginx libnginx-mod-http-js, or make test-services)")  # fmt: skip
    return found


def _running_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / PID_NAME).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _get(url: str, token: str | None) -> int:
    """The HTTP status of GET `url` (with the team token, if given); 0 when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def start(
    directory: Path,
    template: Path,
    gateway_js: Path,
    listen: str,
    inference_url: str,
    key_file: Path,
    nginx: str = "nginx",
    timeout: float = 30,
) -> str:
    """Write the gateway's config and token into `directory` and start nginx from there (or reload
    the one already running there); returns the gateway's base URL as seen from this host, once it
    has passed an authorised /ping through to TorchServe.

    Raises TeamError with what to do: no token, no key file (TorchServe not started), no nginx, or a
    gateway that does not come up or cannot reach TorchServe.
    """
    token = team_token()
    if not key_file.is_file():
        raise TeamError(f"no {key_file}: TorchServe writes it when it starts (make serve), in its working directory")
    binary = _nginx(nginx)
    config = render_config(template.read_text(), directory, listen, inference_url, key_file, gateway_js)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / "tmp").mkdir(exist_ok=True)
    token_file = directory / TOKEN_NAME
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    (directory / CONFIG_NAME).write_text(config)
    command = [binary, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(directory / CONFIG_NAME)]
    checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
    if checked.returncode != 0:
        raise TeamError(f"nginx refuses {directory / CONFIG_NAME}:\n{checked.stderr.strip()}")
    running = _running_pid(directory) is not None
    started = subprocess.run([*command, *(["-s", "reload"] if running else [])], capture_output=True, text=True)
    if started.returncode != 0:
        raise TeamError(f"nginx did not start:\n{started.stderr.strip()}")
    host, port = _host_port(listen, "--listen")
    base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    deadline = time.monotonic() + timeout
    health = ping = 0
    while time.monotonic() < deadline:
        health = _get(base + HEALTH_PATH, None)
        ping = _get(base + "/ping", token) if health == 200 else 0
        if ping == 200:
            return base
        time.sleep(0.2)
    if health != 200:
        stop(directory)
        raise TeamError(f"the gateway did not answer on {listen}; see {directory / 'error.log'}")
    raise TeamError(
        f"the gateway runs, but TorchServe at {inference_url} answered its /ping with {ping or 'nothing'} "
        f"(key file {key_file}): is TorchServe running there? The gateway stays up; stop it with "
        "sam-fast-serve team-stop"
    )


def stop(directory: Path, timeout: float = 30) -> bool:
    """Stop the gateway started from `directory` (its nginx finishes the requests it has); returns
    False when none runs there."""
    pid = _running_pid(directory)
    if pid is None:
        return False
    os.kill(pid, signal.SIGQUIT)  # nginx's graceful shutdown
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _running_pid(directory) is not None:
        time.sleep(0.1)
    return True


def public_url(listen: str) -> str:
    """The URL laptops use: the listen address, with this host's name for all interfaces."""
    host, port = _host_port(listen, "--listen")
    return f"http://{socket.getfqdn() if host == '0.0.0.0' else host}:{port}"
