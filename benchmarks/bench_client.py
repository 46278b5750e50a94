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
import subprocess
import time
from pathlib import Path

import requests
from skimage import data

from benchmarks.measure import CLIENT, make_images, repo_archive, scratch_dir
from harness.archives import KEEP_ALL
from harness.files import encode
from harness.servers import TorchServe
from sam_fast_serve.client.cli import DEFAULT_CONCURRENCY
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.tools.cli import save_random_checkpoint

SIDE = 512


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
    make_images(work / "images", args.images, SIDE)
    # No embedding cache: no run is answered from an earlier run's embeddings.
    tgz = repo_archive(checkpoint, work, embedding_cache_bytes=0, **(KEEP_ALL if args.keep_all else {}))
    server = TorchServe(work, tgz.parent, tgz.name)
    server.start()
    try:
        # One request first, so that no run pays for the worker's first-call allocations.
        warm = requests.post(
            f"{server.inference_url}/predictions/{MODEL_NAME}",
            data=encode(data.camera()),
            headers=server.auth(),
            timeout=900,
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
