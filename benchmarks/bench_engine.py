"""Automatic mask generation, side by side in one run: reference vs this engine.

    python -m benchmarks.bench_engine                 # engine mode: the kept-share sweep (one process)
    python -m benchmarks.bench_engine --server        # whole requests through a real TorchServe
    python -m benchmarks.bench_engine --load          # model load time, torch.compile off / cold / warm

Engine mode, on the same photos and the same random-weight vit_b checkpoint: (a) the reference
segment_anything.SamAutomaticMaskGenerator in fp32, (b) this engine at its defaults (dtype auto),
(b') this engine in fp32, (c) the pytorch-labs library if it is importable. One table per kept
share (benchmarks/shares.py: `pred_iou_thresh` at the quantile of each image's predicted IoUs that
lets that share of its 3 x points (point, mask) pairs through, stability filter off, NMS on), the
reference only at the shares of --reference-shares. Stage times come from wrapping the stage
functions of each pipeline for the run; "post" is the rest (stability, boxes, NMS, records). Mask
agreement pairs masks one to one with (a).

Server mode starts TorchServe from a real archive of the same checkpoint with the repo's
model-config.yaml. First, its overhead: at each of --server-shares (and at 100% once more with
`max_masks` raised to every pair of the grid), a fresh start, the first JSON request after READY,
then the same request through TorchServe and answered by the same `MaskService` in this process
(decode, engine, wire; embedding cache off in both), alternately (measure.request_overhead). Then throughput with batchSize
1 and 4: sequential and concurrent requests, the worker's peak RSS, the cold and warm start to READY.

Load mode times, in fresh processes, what a worker does before it is ready (imports, model build,
weights, warm-up) with `compile` off, then on with an empty inductor cache, then on with the
cache the previous run left, and the first two images after that.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import yaml
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from skimage import data as sample_images

from benchmarks.measure import (
    CPU,
    OVERHEAD_COLUMNS,
    REFERENCE,
    SHORT_NAMES,
    PeakRss,
    agreement,
    cpu_model,
    engine_stages,
    gemm_peaks,
    peak_for,
    reference_stages,
    repo_archive,
    request_overhead,
    run_variant,
    scratch_dir,
)
from benchmarks.shares import KEEP_ALL_LABEL, SHARES, predicted_ious, share_label, sweep_setting
from harness.files import encode
from harness.servers import REPO, TorchServe
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.models.fast_decoder import FastMaskDecoder
from sam_fast_serve.models.precision import resolve_precision
from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
from sam_fast_serve.server.runtime import keep_freed_memory
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint


def print_table(title: str, rows: list[dict[str, Any]], reference: dict[str, Any] | None) -> None:
    print(f"\n### {title}: seconds per image (vit_b, {len(rows[0]['outputs'])} images)\n")
    print(
        "| variant | total | encoder | decoder | upsample | post | rle | wire | peak RSS | masks | response bytes "
        "| speedup | agreement with (a) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        speedup = f"{reference['total'] / row['total']:.1f}x" if reference else "-"
        agrees = "-" if reference is None or row is reference else agreement(reference, row)
        print(
            f"| {row['name']} | {row['total']:.2f} | {row['encoder']:.2f} | {row['decoder']:.2f} "
            f"| {row['upsample']:.2f} | {row['post']:.2f} | {row['rle']:.2f} | {row['wire']:.3f} "
            f"| {row['rss'] / 2**30:.2f} GiB | {row['masks']:.0f} | {row['bytes']:,.0f} | {speedup} | {agrees} |"
        )


def print_sweep(sweep: dict[str, dict[str, dict[str, Any]]]) -> None:
    """One line per kept share: total seconds per image of each variant, and speed-ups over (a)."""
    # The reference first, whichever share it first ran at.
    names = sorted(dict.fromkeys(name for rows in sweep.values() for name in rows), key=lambda n: n != REFERENCE)
    reference = REFERENCE if REFERENCE in names else None
    engines = [n for n in names if n != reference]
    print("\n### Summary: seconds per image by kept share\n")
    print("| kept | " + " | ".join(names) + " | " + " | ".join(f"{n.split(')')[0]}) vs (a)" for n in engines) + " |")
    print("|---" * (1 + len(names) + len(engines)) + "|")
    for share, rows in sweep.items():
        cells = [f"{rows[n]['total']:.2f}" if n in rows else "-" for n in names]
        ratios = [f"{rows[reference]['total'] / rows[n]['total']:.1f}x" if reference in rows else "-" for n in engines]
        print(f"| {share} | " + " | ".join(cells + ratios) + " |")


def flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def decoder_flops_per_grid(sam: torch.nn.Module, points: int) -> dict[str, int]:
    """FLOPs of decoding `points` point prompts with all three multimask outputs, 64 at a time:
    the reference mask decoder, and the fast decoder (per-image part once, all masks computed)."""
    image, pe, dense = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    sparse = torch.randn(64, 2, 256)
    batches = points // 64
    reference = flops(lambda: sam.mask_decoder.predict_masks(image, pe, sparse, dense.expand(64, -1, -1, -1)))
    fast = FastMaskDecoder(sam.mask_decoder)
    state = fast.prepare_image(image, pe, dense)
    per_image = flops(lambda: fast.prepare_image(image, pe, dense))
    every_mask = torch.arange(64 * 3)
    per_batch = flops(
        lambda: fast.mask_logits(fast.run_transformer(state, sparse), every_mask // 3, every_mask % 3 + 1)
    )
    return {"reference": reference * batches, "fast": per_image + per_batch * batches}


def hardware_report(sam: torch.nn.Module, rows: dict[str, dict[str, Any]], points: int) -> None:
    """Counted FLOPs over measured time, against the best measured GEMM rate of the dtype."""
    encoder_flops = flops(lambda: sam.image_encoder(torch.randn(1, 3, 1024, 1024)))
    decoder_flops = decoder_flops_per_grid(sam, points)
    peaks = gemm_peaks()
    print("\n### Hardware limit\n")
    print("measured GEMM peak (GFLOP/s, best of 8): " + "; ".join(f"{name} {rate:.0f}" for name, rate in peaks.items()))
    print(
        f"FLOPs per image: image encoder {encoder_flops / 1e9:.0f} GFLOP; mask decoder for {points} points "
        f"(all masks): reference {decoder_flops['reference'] / 1e9:.0f} GFLOP, fast decoder "
        f"{decoder_flops['fast'] / 1e9:.0f} GFLOP ({decoder_flops['reference'] / decoder_flops['fast']:.1f}x fewer)"
    )
    for name, row in rows.items():
        dtype = torch.bfloat16 if "bf16" in name or "int8" in name else torch.float32
        peak = peak_for(dtype, peaks)
        decoder = decoder_flops["reference" if name == REFERENCE else "fast"]
        parts = [
            f"{stage} {work / row[stage] / 1e9:.0f} GFLOP/s = {work / row[stage] / 1e9 / peak:.0%}"
            for stage, work in (("encoder", encoder_flops), ("decoder", decoder))
        ]
        print(
            f"{name}: "
            + ", ".join(parts)
            + f" of the best measured {'bf16' if dtype == torch.bfloat16 else 'fp32'} GEMM"
        )


def engine_mode(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    checkpoint = args.checkpoint or save_random_checkpoint(scratch_dir() / "random_vit_b.pth")
    images = [getattr(sample_images, name)() for name in args.images.split(",")]
    started = time.perf_counter()
    reference_sam = cpu_model(checkpoint)
    load_s = time.perf_counter() - started
    engine_dtype = resolve_precision("auto", CPU).dtype
    engine_sam = cpu_model(checkpoint, engine_dtype)
    fp32_sam = cpu_model(checkpoint, torch.float32)
    dtype_name = SHORT_NAMES[engine_dtype]
    print(
        f"# bench_engine: vit_b, {args.points_per_side}x{args.points_per_side} points, images {args.images}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model build+load {load_s:.1f} s"
    )
    try:
        import segment_anything_fast  # noqa: F401

        print("(c) pytorch-labs segment_anything_fast is importable but not wired into this benchmark")
    except ImportError:
        print("(c) pytorch-labs segment_anything_fast: not importable here (not on PyPI); row omitted")
    ious = [predicted_ious(reference_sam, image, args.points_per_side) for image in images]
    base = {"points_per_side": args.points_per_side, "output_mode": "coco_rle"}
    variants: list[tuple[str, Callable[[dict[str, Any]], Any], Any]] = [
        (REFERENCE, lambda kw: ReferenceGenerator(reference_sam, **kw), reference_stages),
        (
            f"(b) engine defaults ({dtype_name})",
            lambda kw: SamAutomaticMaskGenerator(engine_sam, decoder_dtype=engine_dtype, **kw),
            engine_stages,
        ),
        ("(b') engine fp32", lambda kw: SamAutomaticMaskGenerator(fp32_sam, **kw), engine_stages),
    ]
    if args.int8:
        int8 = resolve_precision("int8", CPU)
        int8_sam = cpu_model(checkpoint, int8)
        variants.append(
            (
                "(b'') engine int8",
                lambda kw: SamAutomaticMaskGenerator(int8_sam, decoder_dtype=int8.dtype, **kw),
                engine_stages,
            )
        )
    reference_shares = {share_label(token) for token in args.reference_shares.split(",") if token}
    sweep: dict[str, dict[str, dict[str, Any]]] = {}
    for token in args.shares.split(","):
        label, title, settings = sweep_setting(token, ious, base)
        rows = [
            run_variant(name, make, stages, images, settings)
            for name, make, stages in variants
            if label in reference_shares or name != REFERENCE
        ]
        reference = rows[0] if rows[0]["name"] == REFERENCE else None
        print_table(title, rows, reference)
        sweep[label] = {row["name"]: row for row in rows}
    print_sweep(sweep)
    # The decoder's FLOPs are counted with every mask computed: keep-all.
    if REFERENCE in sweep.get(KEEP_ALL_LABEL, {}):
        hardware_report(reference_sam, sweep[KEEP_ALL_LABEL], args.points_per_side**2)
    for token in args.profile.split(",") if args.profile else []:
        _, title, (settings,) = sweep_setting(token, ious[:1], base)
        image_profile(f"{variants[1][0]}, {title}", variants[1][1], images[0], settings)


def image_profile(title: str, make: Callable[[dict[str, Any]], Any], image: np.ndarray, kwargs: dict[str, Any]) -> None:
    """Where one image's time goes, op by op (torch.profiler, self CPU time), and how much of the
    wall time no torch op accounts for (Python, the C extensions: pycocotools, NMS bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    generator = make(kwargs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        generator.generate(image)
        wall = time.perf_counter() - started
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops = sum(e.self_cpu_time_total for e in ops) / 1e6
    print(f"\n### Profile: {title} (one image, {wall:.2f} s under the profiler; torch ops {in_ops:.2f} s)\n")
    print("| op | calls | self s | share of wall | ms per call |")
    print("|---|---|---|---|---|")
    for event in ops[:15]:
        seconds = event.self_cpu_time_total / 1e6
        print(
            f"| {event.key} | {event.count} | {seconds:.2f} | {seconds / wall:.0%} | {1e3 * seconds / event.count:.2f} |"
        )
    print(f"| outside torch ops | | {wall - in_ops:.2f} | {(wall - in_ops) / wall:.0%} | |")


def overhead_table(args: argparse.Namespace, checkpoint: Path, image: np.ndarray, png: bytes) -> None:
    """A whole request through TorchServe against the same request handled in this process."""
    ious = predicted_ious(cpu_model(checkpoint), image, args.points_per_side)
    all_pairs = 3 * args.points_per_side**2
    tokens = args.server_shares.split(",")
    print(f"\n| kept | max_masks | {OVERHEAD_COLUMNS} |")
    print("|---|---|---|---|---|---|---|---|---|")
    # With random weights NMS leaves few masks at any share: only keep-all makes a large response,
    # once under the default max_masks and once with the cap raised to every pair.
    for cap, cap_tokens in ((None, tokens), (all_pairs, ["all"])):
        work = scratch_dir()
        extra = {"embedding_cache_bytes": 0, "points_per_side": args.points_per_side}
        properties = ""
        if cap is not None:
            # 3072 masks of a 512x512 image are ~77 MB pickled: over the 64 MiB limits of both sides.
            extra.update(max_masks=cap, max_response_bytes=2**27)
            properties = f"max_response_size={2**27}\n"
        archive = repo_archive(checkpoint, work, **extra)
        section = yaml.safe_load((work / "model-config.yaml").read_text())["handler"]
        service = MaskService.load(section, checkpoint.parent, gpu_id=None)
        server = TorchServe(work, archive.parent, archive.name, extra_properties=properties)
        for token in cap_tokens:
            label, _, (settings,) = sweep_setting(token, [ious], {})
            document = {"image": base64.b64encode(png).decode(), **settings}
            overhead = request_overhead(server, service, document)
            print(f"| {label} | {service.config.max_masks} | {overhead.cells()} |", flush=True)


def server_mode(args: argparse.Namespace) -> None:
    checkpoint = args.checkpoint or save_random_checkpoint(scratch_dir() / "random_vit_b.pth")
    png = {name: encode(getattr(sample_images, name)()) for name in args.images.split(",")}
    first = args.images.split(",")[0]
    print(
        f"# bench_engine --server: TorchServe, repo model-config.yaml with a random-weight vit_b, "
        f"{args.points_per_side}x{args.points_per_side} points; overhead on {first}"
    )
    overhead_table(args, checkpoint, getattr(sample_images, first)(), png[first])
    if not args.batch_sizes:
        return
    print(f"\nThroughput, default thresholds, images {args.images}:")
    print(
        "\n| batchSize | cold start to READY | warm restart to READY | sequential s/request | "
        f"{args.concurrency} clients: requests/s | p50 latency | worker peak RSS | response bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch_size in map(int, args.batch_sizes.split(",")):
        work = scratch_dir()
        archive = repo_archive(checkpoint, work, batch_size)
        server = TorchServe(work, archive.parent, archive.name)
        cold = server.start()
        try:
            server.stop()
            warm = server.start()
            url = f"{server.inference_url}/predictions/{MODEL_NAME}"
            headers = {**server.auth(), "Content-Type": "application/octet-stream"}
            bodies = list(png.values())

            def one(i: int) -> tuple:
                started = time.perf_counter()
                reply = requests.post(url, data=bodies[i % len(bodies)], headers=headers, timeout=900)
                reply.raise_for_status()
                return time.perf_counter() - started, len(reply.content)

            pid = server.worker_pids()[0]
            with PeakRss(int(pid)) as rss:
                sequential = [one(i) for i in range(args.requests)]
                started = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    concurrent = list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - started
            print(
                f"| {batch_size} | {cold:.1f} s | {warm:.1f} s | {np.mean([s for s, _ in sequential]):.2f} | "
                f"{args.requests / wall:.3f} | {np.median([s for s, _ in concurrent]):.1f} s | "
                f"{rss.peak / 2**30:.2f} GiB | {np.mean([b for _, b in sequential]):,.0f} |"
            )
        finally:
            server.stop()


# Runs in a fresh process: the service loaded as the handler loads it, then two images.
_LOAD_SCRIPT = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from skimage import data
from sam_fast_serve.server.service import MaskService
section, model_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
service = MaskService.load(section, model_dir, gpu_id=None)
times = [time.perf_counter() - started]
for image in (data.astronaut(), data.chelsea()):
    started = time.perf_counter()
    service.engine.automatic([image], service.config.amg)
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def load_mode(args: argparse.Namespace) -> None:
    checkpoint = args.checkpoint or save_random_checkpoint(scratch_dir() / "random_vit_b.pth")
    cache = str(scratch_dir(prefix="inductor-cache-"))
    print(
        f"# bench_engine --load: vit_b, repo model-config.yaml handler section, fresh process per row, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "\n| compile | start to ready (imports, build, weights, warm-up) | first image (astronaut) | next image (chelsea) |"
    )
    print("|---|---|---|---|")
    for label, compile_encoder in (("off", False), ("on, empty cache", True), ("on, cache from the run above", True)):
        section = {
            **yaml.safe_load((REPO / "model-config.yaml").read_text())["handler"],
            "sam_checkpoint": checkpoint.name,
            "compile": compile_encoder,
        }
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, json.dumps(section), str(checkpoint.parent)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        ready, first, second = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {ready:.1f} s | {first:.2f} s | {second:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", action="store_true", help="time whole requests through TorchServe")
    parser.add_argument("--load", action="store_true", help="time model load with torch.compile off, cold, warm")
    parser.add_argument("--checkpoint", type=Path, help="default: a random-weight vit_b (seed 0)")
    parser.add_argument("--images", default="astronaut,chelsea")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument(
        "--shares", default=",".join([*map(str, SHARES), "all"]), help="kept shares to sweep (0 to 1, all = keep-all)"
    )
    parser.add_argument(
        "--reference-shares", default="0,0.3,1,all", help="--shares at which the reference runs too; empty: none"
    )
    parser.add_argument("--int8", action="store_true", help="add the engine with dtype int8")
    parser.add_argument("--profile", default="", help="--shares at which to profile (b) op by op, e.g. 0.3,all")
    parser.add_argument("--server-shares", default="0,0.3,1,all", help="kept shares of the overhead table, as --shares")
    parser.add_argument("--batch-sizes", default="1,4", help="of the throughput table; empty: no such table")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    # The process keeps freed memory as a worker's does (MaskService.load): for every row, the reference's too.
    keep_freed_memory()
    if args.server:
        server_mode(args)
    elif args.load:
        load_mode(args)
    else:
        engine_mode(args)


if __name__ == "__main__":
    main()
