"""Shared fixtures: a random-weight vit_b checkpoint, sample photos, image file encoders."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
from local_server import REPO, TorchServe
from PIL import Image
from skimage import data

from sam_fast_serve.archive import build_archive
from sam_fast_serve.cli import save_random_checkpoint
from sam_fast_serve.endpoint import MODEL_NAME

# Every mask is kept (random weights give no mask above the default thresholds), on a small grid.
KEEP_ALL = {
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
}


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size vit_b state dict with random weights (seed 0), named random_vit_b.pth."""
    return save_random_checkpoint(tmp_path_factory.mktemp("weights") / "random_vit_b.pth", "vit_b", seed=0)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return data.chelsea()


class RunsCommand:
    """Pickles to a call of os.system: a hostile payload for decoders to refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb when that is huge)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + pixels + _png_chunk(b"IEND", b"")


def tiff(samples: np.ndarray, **options: Any) -> bytes:
    """TIFF file bytes of `samples`, written by tifffile with `options` (photometric, compression, ...)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, **options)
    return buffer.getvalue()


def tiff_claiming(width: int, height: int) -> bytes:
    """A small TIFF whose first page's header claims width x height (tifffile writes both as LONG)."""
    data = bytearray(tiff(np.zeros((4, 4), np.uint8)))
    for tag, value in ((256, width), (257, height)):
        at = data.index(struct.pack("<HHI", tag, 4, 1)) + 8
        data[at : at + 4] = struct.pack("<I", value)
    return bytes(data)


def encode(rgb_or_pil, fmt: str = "PNG", **params) -> bytes:
    """Image file bytes of an RGB array (or PIL image) in `fmt`."""
    image = rgb_or_pil if isinstance(rgb_or_pil, Image.Image) else Image.fromarray(rgb_or_pil)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def smoke_archive(workdir: Path, checkpoint: Path, model_name: str = MODEL_NAME, **overrides: Any) -> Path:
    """A real archive in workdir/model_store of `checkpoint` with the smoke config plus `overrides`
    (top-level TorchServe keys, or `handler` keys given as handler={...})."""
    config = yaml.safe_load((REPO / "tests" / "smoke-config.yaml").read_text())
    config["handler"].update(overrides.pop("handler", {}))
    config.update(overrides)
    (workdir / f"{model_name}-config.yaml").write_text(yaml.safe_dump(config))
    return build_archive(
        REPO / "custom_handler.py",
        checkpoint,
        workdir / f"{model_name}-config.yaml",
        workdir / "model_store",
        model_name,
    )


@contextlib.contextmanager
def running_server(workdir: Path, checkpoint: Path, **overrides: Any) -> Iterator[TorchServe]:
    """TorchServe serving a smoke_archive (see there for `overrides`); stopped in every case."""
    archive = smoke_archive(workdir, checkpoint, **overrides)
    server = TorchServe(workdir, archive.parent, archive.name)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client_command(server: TorchServe | None = None) -> list[str]:
    """The client as users run it from a checkout (`python inference.py`), pointed at `server`."""
    command = [sys.executable, str(REPO / "inference.py")]
    if server is not None:
        # --token=VALUE: a TorchServe token may begin with "-", which argparse would take for an option.
        command += ["--url", server.inference_url, f"--token={server.token()}"]
    return command


def run_client(
    *args: object, server: TorchServe | None = None, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run the client with `args` to the end; its output captured as text."""
    return subprocess.run(
        [*client_command(server), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="session")
def reference_sam(random_checkpoint):
    """segment_anything's model (fp32) with the random checkpoint: the reference for equivalence."""
    from sam_fast_serve.build import sam_model_fast_registry

    return sam_model_fast_registry["vit_b"](str(random_checkpoint))


@pytest.fixture(scope="session")
def fp32_service(random_checkpoint, tmp_path_factory):
    """The mask service in fp32, keep-all on an 8x8 grid, loaded as the handler loads it."""
    from sam_fast_serve.service import MaskService

    model_dir = tmp_path_factory.mktemp("model_dir")
    (model_dir / random_checkpoint.name).symlink_to(random_checkpoint)
    section = {
        "model_type": "vit_b",
        "sam_checkpoint": random_checkpoint.name,
        "dtype": "float32",
        "points_per_side": 8,
        "points_per_batch": 64,
        **KEEP_ALL,
    }
    return MaskService.load(section, model_dir, gpu_id=None)


@pytest.fixture(scope="session")
def reference_predictor(reference_sam, astronaut):
    """segment_anything.SamPredictor (fp32) with the astronaut photo set."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(reference_sam)
    predictor.set_image(astronaut)
    return predictor
