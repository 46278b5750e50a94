"""sam-fast-client throughput through one TorchServe: the same folder of images at --concurrency 1
and at the client's default, each run into a fresh output folder.

    python -m benchmarks.bench_client                    # 24 images, the repo's model-config.yaml
    python -m benchmarks.bench_client --keep-all         # thresholds 0, NMS off: up to max_masks masks per image
    python -m benchmarks.bench_client --images 48 --concurrency 1,4,8

One TorchServe is started from a real archive of a random-weight vit_b with the repo's
model-config.yaml (batchSize 4, maxBatchDelay 50 ms), its embedding cache turned off so that no run
is answered from an earlier run's embeddings. Every image has pixels of its own (512x512). Each
run is the installed `sam-fast-client` command (overlays on, no progress bar), timed from start to
exit. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image
from skimage import data

from benchmarks.bench_engine import KEEP_ALL
from benchmarks.measure import scratch_dir
from sam_fast_serve.client.cli import DEFAULT_CONCURRENCY
from sam_fast_serve.tools.archive import build_archive
from sam_fast_serve.tools.cli import save_random_checkpoint
from harness.servers import REPO, TorchServe

CLIENT = Path(sys.executable).parent / "sam-fast-client"
SIDE = 512


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, "PNG")
    return buffer.getvalue()


def make_images(folder: Path, count: int) -> None:
    """`count` PNGs of SIDE x SIDE in `folder`, each with pixels of its own: scikit-image photos
    cropped to a square, resized, and rolled by a different offset."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    squares = []
    for rgb in photos:
        side = min(rgb.shape[:2])
        squares.append(np.asarray(Image.fromarray(rgb[:side, :side]).resize((SIDE, SIDE))))
    folder.mkdir(parents=True)
    for i in range(count):
        rolled = np.roll(squares[i % len(squares)], 17 * (i // len(squares)) + 1, axis=1)
        (folder / f"image{i:04d}.png").write_bytes(png(rolled))


def archive(work: Path, checkpoint: Path, keep_all: bool) -> Path:
    """An archive of `checkpoint` with the repo's model-config.yaml, no embedding cache, and
    keep-all thresholds if asked."""
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config["handler"].update(sam_checkpoint=checkpoint.name, embedding_cache_bytes=0)
    if keep_all:
        config["handler"].update(KEEP_ALL)
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    return build_archive(REPO / "custom_handler.py", checkpoint, work / "model-config.yaml", work / "model_store")


def start_server(work: Path, checkpoint: Path, keep_all: bool) -> TorchServe:
    """TorchServe serving `archive(...)`; READY on return."""
    tgz = archive(work, checkpoint, keep_all)
    server = TorchServe(work, tgz.parent, tgz.name)
    server.start()
    return server


def timed_run(server: TorchServe, folder: Path, out: Path, concurrency: int) -> float:
    """Seconds for `sam-fast-client` over `folder` into `out` at `concurrency`; it must succeed."""
    started = time.perf_counter()
    subprocess.run(
        [str(CLIENT), str(folder), "--url", server.inference_url, f"--token={server.token()}", "--out", str(out),
         "--concurrency", str(concurrency), "--progress", "never"],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument(
        "--concurrency", default=f"1,{DEFAULT_CONCURRENCY}", help="comma-separated; the first is the baseline"
    )
    parser.add_argument(
        "--keep-all", action="store_true", help="thresholds 0 and NMS off (every mask kept, up to max_masks)"
    )
    parser.add_argument("--checkpoint", type=Path, help="default: a random-weight vit_b (seed 0)")
    args = parser.parse_args()
    work = scratch_dir(prefix="bench-client-")
    checkpoint = args.checkpoint or save_random_checkpoint(work / "random_vit_b.pth")
    make_images(work / "images", args.images)
    server = start_server(work, checkpoint, args.keep_all)
    try:
        # One request first, so that no run pays for the worker's first-call allocations.
        warm = requests.post(
            f"{server.inference_url}/predictions/sam-fast", data=png(data.camera()), headers=server.auth(), timeout=900
        )
        warm.raise_for_status()
        setting = "keep-all" if args.keep_all else "default thresholds"
        print(
            f"# bench_client: {args.images} images {SIDE}x{SIDE}, TorchServe with the repo model-config.yaml "
            f"(batchSize 4), {setting}, random-weight vit_b, embedding cache off\n"
        )
        print("| concurrency | images | wall s | images/s | vs concurrency " + args.concurrency.split(",")[0] + " |")
        print("|---|---|---|---|---|")
        baseline = None
        for concurrency in map(int, args.concurrency.split(",")):
            seconds = timed_run(server, work / "images", work / f"out-{concurrency}", concurrency)
            rate = args.images / seconds
            baseline = baseline or rate
            print(
                f"| {concurrency} | {args.images} | {seconds:.1f} | {rate:.3f} | {rate / baseline:.2f}x |", flush=True
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
