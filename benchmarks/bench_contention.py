"""Speed that survives a busy machine: each variant alone, then beside a fixed CPU load, in one run.

    python -m benchmarks.bench_contention                       # chelsea, 30% kept, both loads
    python -m benchmarks.bench_contention --loads spin --variants engine,engine-passive

Every variant runs in a process of its own (OpenMP reads its environment when torch loads), builds
its model from the same random-weight vit_b checkpoint, warms up, then segments the image once on
a quiet machine and once beside the load, at the thresholds that keep `--share` of the (point, mask)
pairs (benchmarks/shares.py; NMS on). Loads:

    spin   two busy-loop processes, one per core of this 2-core machine (another program's threads)
    twin   a second process of the same variant segmenting the same image in a loop (two workers
           sharing the cores)

The slowdown factor is loaded seconds over quiet seconds; "CPU s" is the user + system time the
variant's process used for the image (threads that spin while waiting burn CPU the load wanted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from benchmarks.measure import cpu_model, scratch_dir

# name -> (generator kind, environment, torch threads or None for torch's default, the decoder's
# chunk bytes and freed memory kept or None for the engine's own settings)
VARIANTS: dict[str, tuple[str, dict[str, str], int | None, tuple[int, bool] | None]] = {
    "reference": ("reference", {}, None, None),
    "engine": ("engine", {}, None, None),
    "engine-small-chunks": ("engine", {}, None, (16 << 20, False)),
    "engine-passive": ("engine", {"OMP_WAIT_POLICY": "PASSIVE"}, None, None),
    "engine-1-thread": ("engine", {}, 1, None),
    # libgomp spins this many times between parallel regions before sleeping (its default
    # 300000 when OMP_WAIT_POLICY is unset): between spinning forever and PASSIVE's never.
    "engine-spincount-10k": ("engine", {"GOMP_SPINCOUNT": "10000"}, None, None),
    "engine-spincount-1k": ("engine", {"GOMP_SPINCOUNT": "1000"}, None, None),
}
LOADS = ("spin", "twin")


def child(spec: dict[str, Any]) -> None:
    """Runs in the variant's process: load, warm up, say "ready", then one line of JSON per "run"
    read on stdin (or segment forever with spec["loop"])."""
    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
    from skimage import data as sample_images

    from sam_fast_serve.models import fast_decoder
    from sam_fast_serve.models.precision import resolve_precision
    from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
    from sam_fast_serve.server.runtime import keep_freed_memory

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["chunks"] is None:
        keep_freed_memory()  # as a worker does (MaskService.load)
    else:  # the engine as it was before 128 MiB chunks and kept memory
        fast_decoder._CPU_CHUNK_BYTES = spec["chunks"][0]
    settings = {"points_per_side": spec["points_per_side"], "output_mode": "coco_rle", **spec["settings"]}
    if spec["kind"] == "reference":
        generator: Any = ReferenceGenerator(cpu_model(spec["checkpoint"]), **settings)
    else:
        dtype = resolve_precision("auto", torch.device("cpu")).dtype
        generator = SamAutomaticMaskGenerator(cpu_model(spec["checkpoint"], dtype), decoder_dtype=dtype, **settings)
    image = getattr(sample_images, spec["image"])()
    generator.generate(np.ascontiguousarray(image[:64, :64]))
    if spec.get("loop"):
        while True:
            generator.generate(image)
    me = psutil.Process()
    print("ready", flush=True)
    for _ in sys.stdin:
        cpu = me.cpu_times()
        started = time.perf_counter()
        masks = len(generator.generate(image))
        seconds = time.perf_counter() - started
        after = me.cpu_times()
        used = after.user + after.system - cpu.user - cpu.system
        print(json.dumps({"seconds": seconds, "cpu": used, "masks": masks, "threads": torch.get_num_threads()}))
        sys.stdout.flush()


def start_child(spec: dict[str, Any], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_contention", "--child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def ask(process: subprocess.Popen) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("run\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


@contextmanager
def load(kind: str, spec: dict[str, Any], env: dict[str, str]) -> Iterator[None]:
    """The CPU load beside the measured process while inside the block."""
    if kind == "spin":
        processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    else:
        twin = start_child({**spec, "loop": True}, env)
        processes = [twin]
    time.sleep(2)
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--image", default="chelsea")
    parser.add_argument("--share", type=float, default=0.3, help="kept share of the (point, mask) pairs")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--loads", default=",".join(LOADS))
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch
    from skimage import data as sample_images

    from benchmarks.shares import predicted_ious, share_settings
    from sam_fast_serve.tools.cli import save_random_checkpoint

    torch.manual_seed(0)
    checkpoint = save_random_checkpoint(scratch_dir() / "random_vit_b.pth")
    ious = predicted_ious(cpu_model(checkpoint), getattr(sample_images, args.image)(), args.points_per_side)
    loads = args.loads.split(",")
    print(
        f"# bench_contention: vit_b, {args.points_per_side}x{args.points_per_side} points, {args.image}, "
        f"{args.share:.0%} of the pairs kept (NMS on), {psutil.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        "\n| variant | threads | quiet s | quiet CPU s | "
        + " | ".join(f"beside {k}: s | CPU s | slowdown" for k in loads)
        + " | masks |"
    )
    print("|---|---|---|---|" + "---|---|---|" * len(loads) + "---|")
    for name in args.variants.split(","):
        kind, env, threads, chunks = VARIANTS[name]
        spec = {
            "kind": kind,
            "threads": threads,
            "chunks": chunks,
            "checkpoint": str(checkpoint),
            "image": args.image,
            "points_per_side": args.points_per_side,
            "settings": share_settings(ious, args.share),
        }
        process = start_child(spec, env)
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: the child did not start")
        try:
            quiet = ask(process)
            cells = []
            for kind_of_load in loads:
                with load(kind_of_load, spec, env):
                    loaded = ask(process)
                cells.append(
                    f"{loaded['seconds']:.1f} | {loaded['cpu']:.1f} | {loaded['seconds'] / quiet['seconds']:.2f}x"
                )
            print(
                f"| {name} | {quiet['threads']} | {quiet['seconds']:.1f} | {quiet['cpu']:.1f} | "
                + " | ".join(cells)
                + f" | {quiet['masks']} |",
                flush=True,
            )
        finally:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
