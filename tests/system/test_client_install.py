"""The client-only install (`pip install .`, no extra) in a fresh virtualenv: torch, OpenCV,
segment_anything and TorchServe are not there, imagecodecs is, and its `sam-fast-client` segments a
folder (an LZW TIFF among the photos, drawn by the client too) through a real TorchServe, sends
nothing again on a rerun, and writes a COCO file that holds the server's own masks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data
from test_client import check_coco, post, posts_logged

from harness.files import encode, tiff
from sam_fast_serve.common.wire import decode_pickled

SERVER_PACKAGES = ("torch", "cv2", "segment_anything", "ts")


def test_client_install_has_no_server_packages(client_bin, tmp_path):
    python = str(client_bin / "python")
    for module in SERVER_PACKAGES:
        imported = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd=tmp_path)
        assert imported.returncode != 0 and "ModuleNotFoundError" in imported.stderr, module
    script = (
        "import sys, sam_fast_serve.client.cli\n"
        "print(sam_fast_serve.client.cli.__file__)\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    loaded = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    where, modules = loaded.stdout.splitlines()
    assert Path(where).is_relative_to(client_bin.parent)  # the installed copy, not the checkout
    assert not {*SERVER_PACKAGES, "yaml"} & set(modules.split())
    # tifffile reads LZW, PackBits, JPEG and ZSTD TIFFs with imagecodecs: the client reads what the server reads.
    codecs = subprocess.run([python, "-c", "import imagecodecs"], capture_output=True, text=True, cwd=tmp_path)
    assert codecs.returncode == 0, codecs.stderr


def test_installed_client_segments_resumes_and_writes_coco(client_bin, server, tmp_path):
    folder = tmp_path / "photos"
    images = {
        "coffee.png": data.coffee()[::-1],
        "nested/astronaut.jpg": data.astronaut()[:, ::-1],
        "nested/deeper/chelsea.png": data.chelsea()[::-1, ::-1],
    }
    for name, rgb in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode(np.ascontiguousarray(rgb), "JPEG" if name.endswith(".jpg") else "PNG"))
    lzw = np.ascontiguousarray(data.astronaut()[::2, ::2])
    (folder / "nested" / "scan.tif").write_bytes(tiff(lzw, photometric="rgb", compression="lzw"))
    images["nested/scan.tif"] = lzw
    out = tmp_path / "out"
    command = [
        str(client_bin / "sam-fast-client"), str(folder), "--url", server.inference_url, f"--token={server.token()}",
        "--out", str(out), "--coco", str(out / "coco.json"),
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "4 images: 4 segmented\n" in first.stdout
    with Image.open(out / "nested" / "scan.overlay.png") as overlay:
        assert overlay.size == (lzw.shape[1], lzw.shape[0])

    probe = (folder / "coffee.png").read_bytes()
    before = posts_logged(server, probe)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "4 images: 0 segmented, 4 already done (skipped)\n" in again.stdout
    assert posts_logged(server, probe) == before + 1  # the probe alone: the rerun sent nothing

    answers = {name: decode_pickled(post(server, (folder / name).read_bytes()).text) for name in images}
    check_coco(out / "coco.json", answers, sorted(images))
