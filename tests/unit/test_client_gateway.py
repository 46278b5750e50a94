"""The client against a real HTTP server on 127.0.0.1 that stands in for a gateway (http.server in
a thread): a 401 or 403 stops the run at the first answer with exit status 3, after one request;
a 503 is retried, then one failure."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from harness.files import encode
from sam_fast_serve.client import NotAuthorized, SamClient, ServerBusy
from sam_fast_serve.client.cli import EXIT_FAILED, EXIT_NOT_AUTHORIZED, main


@contextmanager
def answering(status: int, body: dict) -> Iterator[tuple[str, list[str]]]:
    """A server on a free loopback port answering every POST with `status` and `body` as JSON;
    its URL, and the paths it was sent, one per request."""
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            paths.append(self.path)
            content = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def folder(tmp_path, chelsea):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"{i:02}.png").write_bytes(encode(chelsea[i:, i:]))
    return photos


@pytest.mark.parametrize("status", [401, 403])
def test_a_gateway_refusing_the_token_stops_the_run_after_one_request(capsys, tmp_path, folder, status):
    out = tmp_path / "out"
    with answering(status, {"message": "no entry"}) as (url, paths):
        code = main([str(folder), "--url", url, "--token=stale", "--out", str(out), "--coco", str(out / "coco.json")])
    assert code == EXIT_NOT_AUTHORIZED == 3
    assert paths == ["/predictions/sam-fast"]
    shown = capsys.readouterr()
    assert f"the server refused the token (HTTP {status}: no entry)" in shown.err
    assert all(way in shown.err for way in ("--token=VALUE", "$TS_INFERENCE_TOKEN", "key_file.json"))
    assert "0 of 12 images segmented" in shown.out
    assert (out / "failures.jsonl").read_text() == ""  # no image failed: the token did
    assert json.loads((out / "coco.json").read_text())["images"] == []


def test_the_api_raises_not_authorized(folder):
    with answering(401, {"message": "no entry"}) as (url, paths):
        with SamClient(url, token="stale") as sam, pytest.raises(NotAuthorized) as refused:
            sam.segment(folder / "00.png")
    assert (refused.value.status, refused.value.message, len(paths)) == (401, "no entry", 1)


def test_a_busy_server_is_retried_then_one_failure(capsys, tmp_path, folder):
    image = folder / "00.png"
    with answering(503, {"message": "busy"}) as (url, paths):
        with SamClient(url, token="", retries=2, backoff=0) as sam, pytest.raises(ServerBusy) as busy:
            sam.segment(image)
        assert (busy.value.status, busy.value.message) == (503, "busy (after 3 attempts)") and len(paths) == 3
        out = tmp_path / "out"
        code = main([str(image), "--url", url, "--retries", "1", "--backoff", "0", "--out", str(out)])
    assert code == EXIT_FAILED and len(paths) == 5
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure == {"file": str(image), "status": 503, "reason": "busy (after 2 attempts)"}
