"""Security habits that a test can hold us to."""

from __future__ import annotations

import base64
import http.server
import pickle
import re
import threading
import zlib

from harness.archives import run_client
from harness.files import RunsCommand, encode
from harness.servers import REPO
from sam_fast_serve.tools.archive import PACKAGE_DIR, runtime_subpackages

HANDLER = REPO / "custom_handler.py"
SHIPPED = [HANDLER, *sorted(PACKAGE_DIR.rglob("*.py"))]
# What runs in a TorchServe worker: the handler and the modules the archive holds.
SERVER_SIDE = [HANDLER, *(path for name in runtime_subpackages(HANDLER) for path in (PACKAGE_DIR / name).rglob("*.py"))]


def test_client_refuses_a_hostile_pickle_from_the_server(tmp_path, chelsea):
    marker = tmp_path / "pwned"
    hostile = base64.b64encode(zlib.compress(pickle.dumps([RunsCommand(str(marker))]))).decode()

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(hostile.encode())

        def log_message(self, *args):
            pass

    fake = http.server.HTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    image = tmp_path / "c.png"
    image.write_bytes(encode(chelsea))
    try:
        run = run_client(
            image,
            "--url",
            f"http://127.0.0.1:{fake.server_port}",
            "--token",
            "x",
            "--out",
            tmp_path / "out",
            timeout=120,
        )
    finally:
        fake.shutdown()
    assert run.returncode == 1
    assert "refusing to load global" in run.stderr and "system" in run.stderr
    assert not marker.exists()


def test_nothing_shipped_unpickles_or_evals():
    pattern = re.compile(
        r"(pickle\.loads?|pickle\.Unpickler|(?<![\w.])eval|(?<![\w.])exec|yaml\.load|torch\.load)\s*\("
    )
    found = {}
    for path in SHIPPED:
        for line in path.read_text().splitlines():
            if pattern.search(line):
                found[str(path.relative_to(REPO))] = line.strip()
    # The hits: each family loading its checkpoint, with weights_only. (wire.decode_pickled, for
    # clients, subclasses pickle.Unpickler to refuse every global; nothing in a worker calls it.)
    load = 'state = torch.load(checkpoint, map_location="cpu", weights_only=True)'
    assert found == {"sam_fast_serve/models/sam1/build.py": load, "sam_fast_serve/models/sam2/build.py": load}
    assert len(SERVER_SIDE) > 30
    assert not any("decode_pickled(" in path.read_text() for path in SERVER_SIDE if path.name != "wire.py")
