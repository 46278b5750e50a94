"""The client against a real HTTP server on 127.0.0.1 that stands in for a gateway
(harness/recording.py): a 401 or 403 stops the run at the first answer with exit status 3, after one
request, and says where the client looked when it had no token; a 503 is retried, then one failure; an
answer without a reason gets one; an empty file is not sent."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager

import pytest

from harness.files import encode
from harness.recording import Reply, recording
from sam_fast_serve.client import BadRequestError, NotAuthorized, SamClient, ServerBusy, ServerError
from sam_fast_serve.client.batch import EMPTY_FILE
from sam_fast_serve.client.cli import EXIT_FAILED, EXIT_NOT_AUTHORIZED, main
from sam_fast_serve.client.http import unexplained
from sam_fast_serve.common.endpoint import TOKEN_ENV, record_server, state_dir
from sam_fast_serve.common.wire import MAX_REQUEST_SIZE


def answering(status: int, body: dict | bytes) -> AbstractContextManager[tuple[str, list[str]]]:
    """A recording server answering every POST with `status` and `body` (a dict as JSON, bytes as
    they are); its URL, and the paths it was sent, one per request."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    content_type = "application/json" if isinstance(body, dict) else "text/plain"
    reply = Reply(status, content, {"Content-Type": content_type})
    return recording(lambda sent: sent.path, lambda path: reply)


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
    assert "12 images: 0 segmented\n" in shown.out
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


def test_without_a_token_a_refusal_says_where_the_client_looked(capsys, tmp_path, folder, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with answering(401, {"message": "no entry"}) as (url, paths):
        code = main([str(folder), "--url", url, "--out", str(tmp_path / "out")])
    assert code == EXIT_NOT_AUTHORIZED and len(paths) == 1
    looked = (
        f"no inference token: $TS_INFERENCE_TOKEN is unset, no server is recorded for {url} in "
        f"{state_dir() / 'servers'} (make serve records it), and there is no {tmp_path / 'key_file.json'}"
    )
    assert (
        f"the server refused the token (HTTP 401: no entry; {looked}); nothing more was sent."
        in capsys.readouterr().err
    )

    # The key file recorded for that address is the token sent there, and only there.
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "key_file.json").write_text(json.dumps({"inference": {"key": "here"}}))
    record_server(url, tmp_path / "server" / "key_file.json")
    assert SamClient(url).headers["Authorization"] == "Bearer here"
    assert SamClient(url).missing_token is None and SamClient("http://127.0.0.1:9").missing_token is not None


def test_an_answer_without_a_reason_gets_one(folder):
    image = folder / "00.png"
    with answering(413, b"") as (url, paths):  # TorchServe's answer to a body over max_request_size
        with SamClient(url, token="", retries=0) as sam, pytest.raises(BadRequestError) as refused:
            sam.segment(image)
    size = image.stat().st_size
    assert refused.value.status == 413 and refused.value.message == unexplained(413, "", size)
    assert f"the file is {size / 2**20:.1f} MiB ({size} bytes)" in refused.value.message
    with answering(502, b"<html>bad gateway</html>") as (url, paths):
        with SamClient(url, token="", retries=0) as sam, pytest.raises(ServerError) as failed:
            sam.segment(image)
    assert failed.value.message == unexplained(502, "<html>bad gateway</html>", size)
    with answering(404, {"message": ""}) as (url, paths):  # JSON, but no reason in it
        with SamClient(url, token="", retries=0) as sam, pytest.raises(BadRequestError) as missing:
            sam.segment(image)
    assert missing.value.message == unexplained(404, '{"message": ""}', size)


def test_the_reason_of_an_answer_without_one():
    assert unexplained(413, "", 33030144) == (
        "the server refused the request before reading it: the file is 31.5 MiB (33030144 bytes), and the request "
        "is over the server's request size limit (TorchServe's max_request_size; this project's config.properties "
        f"sets {MAX_REQUEST_SIZE} bytes = 25 MiB)"
    )
    assert unexplained(502, "", None) == (
        "the server answered 502 (Bad Gateway: invalid responses from another server/proxy) without a reason"
    )
    assert unexplained(413, " <html>too large</html>\n", None).endswith(
        "without a reason; its answer began '<html>too large</html>'"
    )
    assert unexplained(599, "", None) == "the server answered 599 (a status HTTP does not define) without a reason"


def test_an_empty_file_is_one_failure_and_not_sent(tmp_path, folder):
    (folder / "00.png").write_bytes(b"")
    out = tmp_path / "out"
    with answering(422, {"message": "refused"}) as (url, paths):
        code = main([str(folder), "--url", url, "--token=t", "--out", str(out)])
    assert code == EXIT_FAILED and len(paths) == 11  # every other image was sent
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures[0] == {"file": str(folder / "00.png"), "status": None, "reason": EMPTY_FILE}
    assert len(failures) == 12
