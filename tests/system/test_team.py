"""The team server as `make team-serve` sets it up: a real TorchServe on loopback and in front of it
Debian's nginx running deploy/nginx/team.conf with the shared token of $SAM_FAST_TEAM_TOKEN. A request
with that token is answered through the gateway; a wrong one, TorchServe's own key or none is a 401
that never reaches TorchServe; the client command it prints for the laptops works as printed; the
token stays out of the config, the output and the checkout; `make team-stop` ends it.

The gateway listens on a free loopback port here (TEAM_LISTEN); the Makefile's own default, all
interfaces, is checked without binding it."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from harness.archives import run_client
from harness.files import encode
from harness.servers import REPO, free_port
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.tools import team

TOKEN = secrets.token_urlsafe(24)
MODEL_URL = "/predictions/sam-fast"
VENV = Path(sys.executable).parent.parent


def make(*targets_and_variables: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The checkout's Makefile, with this test's virtualenv."""
    command = ["make", "--no-print-directory", f"VENV={VENV}", *targets_and_variables]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, server):
    """`make team-serve` in front of the shared TorchServe: (server, gateway URL, make's output, team dir)."""
    directory = tmp_path_factory.mktemp("team") / "gateway"
    listen = f"127.0.0.1:{free_port()}"
    variables = [
        f"TEAM_LISTEN={listen}",
        f"INFERENCE_URL={server.inference_url}",
        f"MANAGEMENT_URL={server.management_url}",
        f"KEY_FILE={server.key_file}",
        f"TEAM_DIR={directory}",
    ]
    started = make("team-serve", *variables, env=dict(os.environ, **{team.TOKEN_ENV: TOKEN}))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield server, f"http://{listen}", started, directory
    finally:
        make("team-stop", f"TEAM_DIR={directory}")


def post(url: str, body: bytes, token: str | None) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url + MODEL_URL, data=body, headers=headers, timeout=300)


def test_team_serve_prints_what_to_give_the_laptops(gateway):
    _, url, started, _ = gateway
    assert f'sam-fast-client photos/ --url {url} --token="${team.TOKEN_ENV}"' in started.stdout
    assert "make stop" in started.stdout
    # The running TorchServe was used, not a second one started by make serve.
    assert "torchserve --start" not in started.stdout
    assert TOKEN not in started.stdout + started.stderr


def test_token_is_kept_in_the_gateway_folder_only(gateway):
    _, url, _, directory = gateway
    token_file = directory / team.TOKEN_NAME
    assert token_file.read_text().strip() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    config = (directory / team.CONFIG_NAME).read_text()
    assert TOKEN not in config
    assert re.findall(r"^\s*listen\s+(\S+);", config, re.M) == [url.removeprefix("http://")]
    # Nothing of the gateway's went into the checkout.
    assert not (REPO / "team.conf").exists() and not (REPO / "token").exists()


def test_shared_token_is_answered_through_the_gateway(gateway, astronaut):
    server, url, _, _ = gateway
    png = encode(astronaut)
    through = post(url, png, TOKEN)
    assert through.status_code == 200, through.text[:300]
    direct = post(server.inference_url, png, server.token())
    assert decode_pickled(through.text) == decode_pickled(direct.text)
    assert len(decode_pickled(through.text)) > 0  # the smoke config keeps every mask
    assert through.headers["X-Image-Id"] == direct.headers["X-Image-Id"]


def test_wrong_or_missing_token_is_refused_before_torchserve(gateway, chelsea):
    server, url, _, _ = gateway
    png = encode(chelsea)
    before = server.metric("ts_inference_requests_total")
    for token in (None, "wrong-token-of-some-length", TOKEN[:-1], server.token()):
        refused = post(url, png, token)
        assert refused.status_code == 401, (token, refused.status_code)
        assert "team token" in refused.json()["message"]
    assert server.metric("ts_inference_requests_total") == before


def test_the_printed_client_command_segments_through_the_gateway(gateway, tmp_path):
    _, url, started, _ = gateway
    (printed,) = [line.strip() for line in started.stdout.splitlines() if line.strip().startswith("sam-fast-client")]
    # As a laptop runs it, with the token in its environment and a photo where photos/ was.
    args = shlex.split(printed.replace(f"${team.TOKEN_ENV}", TOKEN))[1:]
    args[0] = str(REPO / "samples" / "astronaut.jpg")
    ran = run_client(*args, "--out", tmp_path / "out", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 image: 1 segmented\n" in ran.stdout
    assert (tmp_path / "out" / "astronaut.json").is_file()


def test_team_serve_refuses_a_short_token(tmp_path):
    refused = subprocess.run(
        [str(VENV / "bin" / "sam-fast-serve"), "team", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(tmp_path)],
        env=dict(os.environ, **{team.TOKEN_ENV: "CHANGE_ME"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and team.TOKEN_ENV in refused.stderr and "16 characters" in refused.stderr
    assert not (tmp_path / team.TOKEN_NAME).exists()


def test_min_token_length_is_the_gateways():
    script = (REPO / "deploy" / "kubernetes" / "gateway.js").read_text()
    assert re.search(r"MIN_TOKEN_LENGTH = (\d+);", script).group(1) == str(team.MIN_TOKEN_LENGTH)


def test_makefile_binds_all_interfaces_only_for_the_gateway():
    planned = make("-n", "team-serve", f"TEAM_DIR={REPO / 'never-made'}")
    assert "--listen 0.0.0.0:8000" in planned.stdout
    assert "0.0.0.0" not in (REPO / "config.properties").read_text()


def test_team_stop_ends_the_gateway(gateway):
    _, url, _, directory = gateway
    stopped = make("team-stop", f"TEAM_DIR={directory}")
    assert stopped.returncode == 0 and "team gateway stopped" in stopped.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(url + team.HEALTH_PATH, timeout=5)
    assert not (directory / "nginx.pid").exists()
