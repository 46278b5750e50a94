"""A recording HTTP server on 127.0.0.1 (http.server in a thread) that stands in for TorchServe or
a gateway in the client's tests: it records every POST it is sent and answers each with what the
test says."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Sent:
    """A POST as the server read it: its path, its headers and its body."""

    path: str
    headers: Message
    body: bytes


@dataclass(frozen=True)
class Reply:
    """An answer to send: its status, its body, and headers beside the Content-Length."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@contextmanager
def recording(read: Callable[[Sent], T], answer: Callable[[T], Reply]) -> Iterator[tuple[str, list[T]]]:
    """A server on a free loopback port that records each POST as `read(sent)` and answers it with
    `answer` of that record; its URL, and the records, one per request in the order they came. Any
    other method is answered 501; the server is shut down when the block ends."""
    records: list[T] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        # A client that stops sending mid-request fails its test instead of holding a thread.
        timeout = 10

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            record = read(Sent(self.path, self.headers, body))
            records.append(record)
            reply = answer(record)
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll: shutdown() waits for it, in every test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", records
    finally:
        server.shutdown()
        server.server_close()
