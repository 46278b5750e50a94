"""Talking to a TorchServe: its default addresses and model name, its key file, and waiting until
a model is READY. Torch-free: the client and the server tools share it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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


def default_inference_token(key_file: Path = KEY_FILE) -> str | None:
    """$TS_INFERENCE_TOKEN, else the inference token of `key_file` if it is there and readable."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    try:
        return read_token(key_file, "inference")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_until_ready(management_url: str, model: str, key_file: Path, timeout: float) -> float:
    """Poll the management API until `model` has a READY worker; returns the seconds waited.

    /ping answers healthy before the model is loaded, so it is not used. Raises TimeoutError.
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
        time.sleep(0.5)
    raise TimeoutError(f"model {model!r} not READY after {timeout:.0f} s (see the TorchServe logs)")
