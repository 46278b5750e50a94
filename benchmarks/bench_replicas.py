"""Throughput as replicas grow: 1 and 2 TorchServe instances behind the shipped nginx balancer
(deploy/nginx/balancer.conf), each worker given its share of the cores, under sam-fast-client at
volume through the balancer.

    python -m benchmarks.bench_replicas                  # 16 images, concurrency 8, default thresholds
    python -m benchmarks.bench_replicas --images 32 --keep-all --runs 1:2,2:1

Each instance is a real TorchServe from an archive of a random-weight vit_b with the repo's
model-config.yaml (batchSize 4, one worker), embedding cache off (every image is encoded), its torch
threads set by OMP_NUM_THREADS: by default cores / instances, so that instances do not fight over the
cores, and once more with every instance on all cores, to show what that fight costs.
One instance is put behind the balancer as both of its replicas. Latency is the client's own per-image
time (request sent to answer read), p50 and p95 over the images. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import numpy as np
import requests

from benchmarks.measure import CLIENT, make_images, repo_archive, scratch_dir
from harness.archives import KEEP_ALL
from harness.servers import Balancer, TorchServe
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.tools.cli import save_random_checkpoint

LATENCY = re.compile(r": \d+ masks, ([\d.]+) s,")


def run(
    work: Path, tgz: Path, instances: int, threads: int, images: Path, concurrency: int
) -> tuple[float, list[float], int]:
    """Wall seconds of one client run through the balancer, each answered image's latency, and the
    number of images that failed (failures.jsonl)."""
    work.mkdir()
    servers = []
    for n in range(instances):
        (work / f"replica-{n}").mkdir()
        servers.append(
            TorchServe(work / f"replica-{n}", tgz.parent, tgz.name, environment={"OMP_NUM_THREADS": str(threads)})
        )
    token = secrets.token_urlsafe(24)
    (work / "balancer").mkdir()
    balancer = Balancer(work / "balancer", (servers * 2)[:2], token)
    try:
        for server in servers:
            server.start()
        balancer.start()
        # One image per instance first, so that no timed request pays for a worker's first call.
        warm = (images / "image0000.png").read_bytes()
        for server in servers:
            url = f"{server.inference_url}/predictions/{MODEL_NAME}"
            requests.post(url, data=warm, headers=server.auth(), timeout=900).raise_for_status()
        started = time.perf_counter()
        done = subprocess.run(
            [str(CLIENT), str(images), "--url", balancer.url, f"--token={token}", "--out", str(work / "out"),
             "--concurrency", str(concurrency), "--progress", "never", "--no-overlay"],
            capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - started
        failures = work / "out" / "failures.jsonl"
        failed = len(failures.read_text().splitlines()) if failures.exists() else 0
    finally:
        balancer.stop()
        for server in servers:
            server.stop()
    return wall, [float(m) for m in LATENCY.findall(done.stdout)], failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--runs",
        default=f"1:{cores},2:{max(1, cores // 2)},2:{cores}",
        help="instances:threads per worker, comma-separated; the first is the baseline",
    )
    parser.add_argument("--keep-all", action="store_true", help="thresholds 0 and NMS off")
    parser.add_argument("--checkpoint", type=Path, help="default: a random-weight vit_b (seed 0)")
    args = parser.parse_args()
    work = scratch_dir(prefix="bench-replicas-")
    checkpoint = args.checkpoint or save_random_checkpoint(work / "random_vit_b.pth")
    make_images(work / "images", args.images)
    tgz = repo_archive(checkpoint, work, embedding_cache_bytes=0, **(KEEP_ALL if args.keep_all else {}))
    setting = "keep-all" if args.keep_all else "default thresholds (random weights keep no mask: a lower bound)"
    print(
        f"# bench_replicas: {args.images} images 512x512, sam-fast-client --concurrency {args.concurrency} through "
        f"the nginx balancer; each instance one worker, batchSize 4, {setting}; {cores} cores\n"
    )
    print("| instances | threads per worker | images | failed | wall s | images/s | p50 s | p95 s | vs first row |")
    print("|---|---|---|---|---|---|---|---|---|")
    baseline = None
    for spec in args.runs.split(","):
        instances, threads = map(int, spec.split(":"))
        wall, latencies, failed = run(
            work / spec.replace(":", "x"), tgz, instances, threads, work / "images", args.concurrency
        )
        rate = len(latencies) / wall
        baseline = baseline or rate
        p50, p95 = np.percentile(latencies, [50, 95])
        print(
            f"| {instances} | {threads} | {len(latencies)} | {failed} | {wall:.1f} | {rate:.3f} | {p50:.1f} | "
            f"{p95:.1f} | {rate / baseline:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
