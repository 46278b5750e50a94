"""READY means ready: the first request after TorchServe reports a model READY against the later ones,
and where each request's seconds go.

    python -m benchmarks.bench_ready                            # sam2.1_hiera_tiny and vit_b, 0% and keep-all
    python -m benchmarks.bench_ready --models test_vit,test_sam2.1_hiera --points-per-side 4 \\
        --shares all --repeats 1                                # a quick check on the test architectures

For each model of --models and each share of --shares: a fresh TorchServe serving an archive of the
smoke config (tests/smoke-config.yaml) on a random checkpoint (seed 0), 32 x 32 points, dtype auto,
no embedding cache; then the same JSON request (the image and that share's thresholds,
benchmarks/shares.py) sent 1 + --repeats times, one after another. For each request: the client's
seconds, the frontend's (the growth of ts_inference_latency_microseconds, the queue included), the
handler's (TorchServe's HandlerTime) and the worker's own stages (the growth of sam_stage_seconds).
The client's seconds less the frontend's are the HTTP transfer; the frontend's less the handler's
are TorchServe's queue and its frontend-worker IPC.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from pathlib import Path
from typing import Any

import requests
from skimage import data as sample_images

from benchmarks.measure import command_line, cpu_description, scratch_dir
from benchmarks.shares import predicted_ious, sweep_setting
from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import TorchServe, sample_sum
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.server.metrics import STAGE_SECONDS, STAGES
from sam_fast_serve.tools.cli import save_random_checkpoint

# The worker's stages the table shows (decode and the store's lookups take milliseconds here).
SHOWN_STAGES = ("image_encoder", "mask_decoder", "postprocess", "wire_encode")
COLUMNS = "client s | frontend s | handler s | " + " | ".join(f"{stage} s" for stage in SHOWN_STAGES)


def counters(server: TorchServe) -> dict[str, float]:
    """The metrics one request adds to: the frontend's total latency (s), the handler time of the
    last batch (s) and the sum of each worker stage (s)."""
    text = server.metrics_text()
    values = {
        "handler": (sample_sum(text, "HandlerTime") or 0.0) / 1e3,
        "frontend": (sample_sum(text, "ts_inference_latency_microseconds") or 0.0) / 1e6,
        "answers": sample_sum(text, f"{STAGE_SECONDS.name}_count", stage="wire_encode") or 0.0,
    }
    for stage in STAGES:
        values[stage] = sample_sum(text, f"{STAGE_SECONDS.name}_sum", stage=stage) or 0.0
    return values


def request_seconds(server: TorchServe, document: dict[str, Any]) -> tuple[dict[str, float], int]:
    """One request: its seconds by where they went (client, frontend, handler, stages), and the
    number of masks it answered."""
    before = counters(server)
    started = time.perf_counter()
    reply = requests.post(
        f"{server.inference_url}/predictions/{MODEL_NAME}", json=document, headers=server.auth(), timeout=900
    )
    client = time.perf_counter() - started
    reply.raise_for_status()
    # The worker's metrics reach the metrics API after its answer: wait for this request's.
    deadline = time.monotonic() + 30
    while (after := counters(server))["answers"] <= before["answers"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker's metrics for the request never arrived")
        time.sleep(0.2)
    seconds = {key: after[key] - before[key] for key in after if key not in ("handler", "answers")}
    return {"client": client, "handler": after["handler"], **seconds}, len(decode_pickled(reply.content))


def ratio(first: float, later: float) -> str:
    """first / later to three places, or "-" where the later ones took no measurable time."""
    return f"{first / later:.3f}" if later >= 0.005 else "-"


def measure(name: str, checkpoint: Path, image: Any, args: argparse.Namespace) -> None:
    """Print one model's table lines: per share, the first request after READY, the later ones,
    and first / the median of the later ones."""
    net = model_type(name).family.code().build(model_type(name), str(checkpoint))
    ious = predicted_ious(net, image, args.points_per_side)
    del net
    png = base64.b64encode(encode(image)).decode()
    for token in args.shares.split(","):
        label, _, (settings,) = sweep_setting(token, [ious], {})
        work = scratch_dir(prefix="bench-ready-")
        handler = {
            "model_type": name,
            "sam_checkpoint": checkpoint.name,
            "dtype": "auto",
            "embedding_cache_bytes": 0,
            "points_per_side": args.points_per_side,
        }
        archive = smoke_archive(work, checkpoint, handler=handler)
        server = TorchServe(work, archive.parent, archive.name)
        ready = server.start()
        try:
            rows = [request_seconds(server, {"image": png, **settings}) for _ in range(1 + args.repeats)]
        finally:
            server.stop()
        lines = []
        for number, (seconds, masks) in enumerate(rows):
            which = "first after READY" if number == 0 else f"later {number}"
            cells = " | ".join(f"{seconds[key]:.2f}" for key in ("client", "frontend", "handler", *SHOWN_STAGES))
            lines.append(f"| {name} | {label} | {which} | {masks} | {cells} |")
        later = [seconds for seconds, _ in rows[1:]]
        ratios = " | ".join(
            ratio(rows[0][0][key], statistics.median(s[key] for s in later))
            for key in ("client", "frontend", "handler", *SHOWN_STAGES)
        )
        lines.append(f"| {name} | {label} | first / later (READY in {ready:.1f} s) | | {ratios} |")
        print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sam2.1_hiera_tiny,vit_b", help="model types")
    parser.add_argument("--image", default="astronaut", help="a skimage.data name")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--shares", default="0,all", help="kept shares of the pairs, 0 to 1 (all = keep-all)")
    parser.add_argument("--repeats", type=int, default=3, help="requests after the first (at least 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1: the first request is compared with the later ones")
    image = getattr(sample_images, args.image)()
    print(f"# bench_ready on {cpu_description()}\n# {command_line()}")
    print(f"\n| model | kept | request | masks | {COLUMNS} |")
    print("|---" * (4 + COLUMNS.count("|") + 1) + "|", flush=True)
    work = scratch_dir(prefix="bench-ready-")
    for name in args.models.split(","):
        checkpoint = save_random_checkpoint(work / f"random_{name}.pth", name)
        measure(name, checkpoint, image, args)


if __name__ == "__main__":
    main()
