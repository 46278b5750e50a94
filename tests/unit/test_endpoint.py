"""The record of the servers started on this machine, and the token a client takes for a server:
$TS_INFERENCE_TOKEN, else the key file recorded for that server, else ./key_file.json; and, when
there is none, the message that says where the client looked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam_fast_serve.common.endpoint import (
    TOKEN_ENV,
    default_inference_token,
    forget_server,
    missing_token,
    record_server,
    recorded_key_file,
    state_dir,
)

URL, OTHER = "http://127.0.0.1:8080", "http://127.0.0.1:9080"


def key_file(path: Path, token: str) -> Path:
    """A key file as TorchServe writes it, with inference token `token`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": token}, "API": {"key": "a"}}))
    return path


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """An empty working folder, a state folder of its own, no token in the environment."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_the_state_folder_is_xdgs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state" / "sam-fast-serve"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "sam-fast-serve"


def test_a_recorded_server_is_found_by_its_url_until_forgotten(here):
    key_file(here / "run" / "key_file.json", "t")
    record = record_server(URL + "/", Path("run/key_file.json"))  # a relative path, recorded absolute
    assert record == state_dir() / "servers" / "127.0.0.1_8080.json"
    assert json.loads(record.read_text()) == {
        "inference_url": URL + "/",
        "key_file": str(here / "run" / "key_file.json"),
    }
    assert recorded_key_file(URL) == here / "run" / "key_file.json"
    assert recorded_key_file(OTHER) is None and recorded_key_file("http://localhost:8080") is None
    forget_server(URL)
    assert recorded_key_file(URL) is None and not record.exists()
    forget_server(URL)  # nothing to forget: no error


def test_the_token_comes_from_the_environment_then_the_record_then_this_folder(here, monkeypatch):
    assert default_inference_token(URL) is None
    key_file(here / "key_file.json", "from-cwd")
    assert default_inference_token(URL) == "from-cwd"
    record_server(URL, key_file(here.parent / "server" / "key_file.json", "recorded"))
    assert default_inference_token(URL) == "recorded"  # the record is that server's: it wins over ./key_file.json
    assert default_inference_token(OTHER) == "from-cwd"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert default_inference_token(URL) == "from-env"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert default_inference_token(URL) == "recorded"
    (here.parent / "server" / "key_file.json").unlink()  # the server went without forgetting itself
    assert default_inference_token(URL) == "from-cwd"


def test_no_token_says_where_the_client_looked(here, monkeypatch):
    servers = state_dir() / "servers"
    assert missing_token(URL) == (
        f"no inference token: ${TOKEN_ENV} is unset, no server is recorded for {URL} in {servers} "
        f"(make serve records it), and there is no {here / 'key_file.json'}"
    )
    gone = here.parent / "server" / "key_file.json"
    record_server(URL, gone)
    (here / "key_file.json").write_text("not JSON")
    monkeypatch.setenv(TOKEN_ENV, "")
    assert missing_token(URL) == (
        f"no inference token: ${TOKEN_ENV} is empty, the key file recorded for {URL} gave none "
        f"(there is no {gone}), and {here / 'key_file.json'} holds no readable inference token"
    )
