"""Talking to a TorchServe: its default addresses and model name, its key file, the servers started
on this machine (each with its key file, so a client finds its token), and waiting until a model is
READY. Torch-free: the client and the server tools share it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import requests

MODEL_NAME = "sam-fast"
INFERENCE_URL = "http://127.0.0.1:8080"
MANAGEMENT_URL = "http://127.0.0.1:8081"
# TorchServe writes its tokens here, in the directory it was started from.
KEY_FILE = Path("key_file.json")
TOKEN_ENV = "TS_INFERENCE_TOKEN"


def read_token(key_file: Path, api: str) -> str:
    """A TorchServe token ('inference' or 'management') from the key_file.json it writes.

    Raises OSError when the file cannot be read, ValueError or KeyError when it is not a key file.
    """
    with open(key_file) as f:
        return str(json.load(f)[api]["key"])


def state_home() -> Path:
    """The user's state folder: $XDG_STATE_HOME, else ~/.local/state (the XDG default)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")


def state_dir() -> Path:
    """Where sam-fast-serve keeps what outlives a command: state_home()/sam-fast-serve."""
    return state_home() / "sam-fast-serve"


def _server_record(inference_url: str) -> Path:
    """The file that records the server at `inference_url`: state_dir()/servers/<host>_<port>.json."""
    parts = urlsplit(inference_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return state_dir() / "servers" / f"{parts.hostname}_{port}.json"


def record_server(inference_url: str, key_file: Path) -> Path:
    """Record that the TorchServe at `inference_url` writes its tokens to `key_file`, so a client
    of that address finds its token from any folder; returns the record's path."""
    record = _server_record(inference_url)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"inference_url": inference_url, "key_file": str(key_file.resolve())}) + "\n")
    return record


def forget_server(inference_url: str) -> None:
    """Drop the record of the server at `inference_url` (it stopped); nothing if there is none."""
    _server_record(inference_url).unlink(missing_ok=True)


def _recorded(record: Path) -> tuple[str, Path] | None:
    """(inference URL, key file) of a record file; None when it is not a readable record."""
    try:
        fields = json.loads(record.read_text())
        return str(fields["inference_url"]), Path(fields["key_file"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_key_file(inference_url: str) -> Path | None:
    """The key file recorded for the server at `inference_url`; None without a readable record."""
    found = _recorded(_server_record(inference_url))
    return found[1] if found else None


def recorded_servers() -> dict[str, Path]:
    """Every server recorded on this machine: {inference URL: key file}."""
    found = (_recorded(record) for record in sorted((state_dir() / "servers").glob("*.json")))
    return dict(item for item in found if item is not None)


def _inference_token(key_file: Path | None) -> str | None:
    """The inference token of `key_file` if it is there and readable, else None."""
    if key_file is None:
        return None
    try:
        return read_token(key_file, "inference")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_inference_token(inference_url: str) -> str | None:
    """The token for the server at `inference_url`: $TS_INFERENCE_TOKEN, else the inference token of
    the key file recorded for that server (precise: it is that server's), else that of
    ./key_file.json (the server started from this folder, whichever it is); None when none is found."""
    return os.environ.get(TOKEN_ENV) or _inference_token(recorded_key_file(inference_url)) or _inference_token(KEY_FILE)


def _no_token_in(key_file: Path) -> str:
    """Why `key_file` gave no token: it is not there, or it holds none that can be read."""
    return f"there is no {key_file}" if not key_file.exists() else f"{key_file} holds no readable inference token"


def missing_token(inference_url: str) -> str:
    """Where `default_inference_token` looked for the token of the server at `inference_url` and
    found none, each place in the order it looked, for an error message."""
    recorded = recorded_key_file(inference_url)
    if recorded is None:
        server = f"no server is recorded for {inference_url} in {state_dir() / 'servers'} (make serve records it)"
    else:
        server = f"the key file recorded for {inference_url} gave none ({_no_token_in(recorded)})"
    environment = "unset" if TOKEN_ENV not in os.environ else "empty"
    return f"no inference token: ${TOKEN_ENV} is {environment}, {server}, and {_no_token_in(Path.cwd() / KEY_FILE)}"


def wait_until_ready(
    management_url: str, model: str, key_file: Path, timeout: float, failed: Callable[[], str | None] | None = None
) -> float:
    """Poll the management API until `model` has a READY worker; returns the seconds waited.

    /ping answers healthy before the model is loaded, so it is not used. `failed`, called between
    polls, returns why waiting longer is pointless (the server exited, the model failed to load).
    Raises TimeoutError, or RuntimeError with what `failed` said.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            headers = {"Authorization": f"Bearer {read_token(key_file, 'management')}"}
            reply = requests.get(f"{management_url}/models/{model}", headers=headers, timeout=5)
            if reply.ok and any(w.get("status") == "READY" for w in reply.json()[0].get("workers", [])):
                return time.monotonic() - started
        except (OSError, ValueError, KeyError, IndexError):
            pass  # server still starting: no key file, no listener or no worker yet
        reason = failed() if failed is not None else None
        if reason:
            raise RuntimeError(f"model {model!r} not READY: {reason}")
        time.sleep(0.5)
    raise TimeoutError(f"model {model!r} not READY after {timeout:.0f} s")
