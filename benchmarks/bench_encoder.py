"""Image encoder benchmark: segment_anything's vit_b encoder vs `accelerate_image_encoder`.

    .venv/bin/python -m benchmarks.bench_encoder [--repeats 3] [--batch 2] [--compile] [--chunk-sweep]
        [--int8-layers]

Prints, for one 1024 x 1024 input (random weights, random relative position tables; speed
does not depend on the values): the encoder's FLOPs, this machine's measured GEMM peak, then
a table of reference and accelerated variants side by side with seconds per image (best of
`--repeats`, runs interleaved), speedups, achieved GFLOP/s and fraction of peak, the growth of
RSS during a call, and the difference to the fp32 reference output. The int8 variant
(`dtype: int8`: bf16 with the linear layers in int8) is there where the CPU has int8 dot
products; its "x fast16" column is its speed-up over the fast bf16 encoder, and `--int8-layers`
times each of its linear layers against the bf16 one, activation quantization included.

The "cpu" column is the process's CPU time over wall time x threads for the best run: well
below 1.0 means another process was competing for the cores and the numbers are not clean.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial

import torch
from segment_anything import build_sam_vit_b
from segment_anything.modeling import ImageEncoderViT
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import PeakRss, gemm_peaks, peak_for
from sam_fast_serve.models.precision import cpu_has_int8_dot
from sam_fast_serve.models.sam1 import fast_encoder
from sam_fast_serve.models.sam1.fast_encoder import accelerate_image_encoder
from sam_fast_serve.models.sam1.quantize import Int8Linear, int8_linear, quantize_activations, quantize_image_encoder

IMAGE_SIZE = 1024
BF16, FP32 = torch.bfloat16, torch.float32


@dataclass
class Variant:
    """One way of running the encoder: `encoder(input.to(dtype))` inside `context()`."""

    name: str
    encoder: ImageEncoderViT
    dtype: torch.dtype  # of the input, and of the arithmetic (for the fraction of peak)
    batch: int = 1
    context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    seconds: list[float] = field(default_factory=list)
    cpu_utilisation: list[float] = field(default_factory=list)
    rss_growth_mib: float = 0.0
    output: torch.Tensor | None = None  # fp32, of the first image


def reference_encoder() -> ImageEncoderViT:
    torch.manual_seed(0)
    encoder = build_sam_vit_b(None).image_encoder.eval()
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0.0, 0.5)
            block.attn.rel_pos_w.normal_(0.0, 0.5)
    return encoder


def autocast_bf16() -> AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=BF16)


def variants(reference: ImageEncoderViT, batch: int) -> list[Variant]:
    reference_bf16 = copy.deepcopy(reference).to(BF16)
    fast_fp32 = accelerate_image_encoder(copy.deepcopy(reference))
    fast_bf16 = accelerate_image_encoder(copy.deepcopy(reference_bf16))
    chosen = [
        Variant("reference fp32", reference, FP32),
        Variant("reference bf16 (cast)", reference_bf16, BF16),
        Variant("reference bf16 (autocast)", reference, BF16, context=autocast_bf16),
        Variant("fast fp32", fast_fp32, FP32),
        Variant("fast bf16 (cast)", fast_bf16, BF16),
        Variant("fast bf16 (autocast)", fast_fp32, BF16, context=autocast_bf16),
    ]
    if cpu_has_int8_dot():
        chosen.append(Variant("fast int8 (bf16 + int8)", quantize_image_encoder(copy.deepcopy(fast_bf16)), BF16))
    if batch > 1:
        chosen.append(Variant(f"reference bf16, batch {batch}", reference_bf16, BF16, batch=batch))
        chosen.append(Variant(f"fast bf16, batch {batch}", fast_bf16, BF16, batch=batch))
    return chosen


def release_free_memory() -> None:
    """Hand glibc's free heap pages back to the OS, so that RSS growth measures one call's needs."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def timed_call(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float, int]:
    """(output, wall seconds, CPU utilisation, peak RSS growth in bytes, sampled every 2 ms)."""
    release_free_memory()
    with PeakRss(interval=0.002) as rss:
        cpu, wall = time.process_time(), time.perf_counter()
        output = call()
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return output, wall, cpu / (wall * torch.get_num_threads()), rss.peak - rss.start


@torch.no_grad()
def run_variants(chosen: list[Variant], image: torch.Tensor, repeats: int) -> None:
    """Warm each variant up once, then time `repeats` rounds, interleaving the variants."""
    for round_index in range(repeats + 1):
        for variant in chosen:
            batch = image.expand(variant.batch, -1, -1, -1).to(variant.dtype)
            with variant.context():
                output, wall, utilisation, growth = timed_call(partial(variant.encoder, batch))
            if round_index == 0:
                variant.output = output[:1].float()
                continue
            variant.seconds.append(wall / variant.batch)
            variant.cpu_utilisation.append(utilisation)
            variant.rss_growth_mib = max(variant.rss_growth_mib, growth / 2**20)
        print(f"  round {round_index}/{repeats} done", file=sys.stderr, flush=True)


@torch.no_grad()
def encoder_flops(reference: ImageEncoderViT, image: torch.Tensor) -> dict[str, int]:
    """FLOPs of one reference forward pass (2 per multiply-add), by aten op."""
    counter = FlopCounterMode(display=False)
    with counter:
        copy.deepcopy(reference).to(BF16)(image.to(BF16))
    return {str(op).split(".")[-1]: count for op, count in counter.get_flop_counts()["Global"].items()}


def print_table(chosen: list[Variant], flops: int, peaks: dict[str, float]) -> None:
    """% peak: the encoder's FLOPs / time over the best GEMM rate of the variant's dtype."""
    reference_fp32, reference_bf16 = chosen[0], chosen[1]
    fast_bf16 = next(variant for variant in chosen if variant.name == "fast bf16 (cast)")
    expected = reference_fp32.output
    header = (
        f"{'variant':<28} {'s/image':>8} {'median':>7} {'x ref32':>8} {'x ref16':>8} {'x fast16':>8} "
        f"{'GFLOP/s':>8} {'% peak':>7} {'cpu':>5} {'+RSS MiB':>9} {'max|diff|':>10} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    for variant in chosen:
        best = min(variant.seconds)
        median = sorted(variant.seconds)[len(variant.seconds) // 2]
        rate = flops / best / 1e9
        fraction = rate / peak_for(variant.dtype, peaks)
        utilisation = variant.cpu_utilisation[variant.seconds.index(best)]
        diff = (variant.output - expected).abs().max().item()
        relative = ((variant.output - expected).norm() / expected.norm()).item()
        print(
            f"{variant.name:<28} {best:>8.2f} {median:>7.2f} {min(reference_fp32.seconds) / best:>8.2f} "
            f"{min(reference_bf16.seconds) / best:>8.2f} {min(fast_bf16.seconds) / best:>8.2f} "
            f"{rate:>8.0f} {100 * fraction:>6.0f}% "
            f"{utilisation:>5.2f} {variant.rss_growth_mib:>9.0f} {diff:>10.2e} {relative:>8.1e}"
        )


def sweep_chunks(reference: ImageEncoderViT, image: torch.Tensor, repeats: int) -> None:
    """Seconds per image of the fast encoder for several attention chunk sizes."""
    encoders = {FP32: accelerate_image_encoder(copy.deepcopy(reference))}
    encoders[BF16] = copy.deepcopy(encoders[FP32]).to(BF16)
    default = fast_encoder._SCORE_CHUNK_BYTES
    print("\nattention chunk sweep (seconds per image, best of repeats)")
    try:
        for chunk_mib in (1, 2, 4, 8, 16, 32):
            fast_encoder._SCORE_CHUNK_BYTES = chunk_mib * 2**20
            cells = []
            for dtype, encoder in encoders.items():
                x = image.to(dtype)
                with torch.no_grad():
                    encoder(x)
                    cells.append(min(timed_call(partial(encoder, x))[1] for _ in range(repeats)))
            print(f"  {chunk_mib:>3} MiB scores: fp32 {cells[0]:.2f} s, bf16 {cells[1]:.2f} s")
    finally:
        fast_encoder._SCORE_CHUNK_BYTES = default


@torch.no_grad()
def time_int8_layers(repeats: int) -> None:
    """Each vit_b linear layer on its real input shape: bf16 (oneDNN) vs int8, with and without the
    activations' quantization, median of `repeats` interleaved calls."""
    print("\nlinear layers, bf16 vs int8 (ms, median; GFLOP/s; int8 with its activation quantization)")
    torch.manual_seed(0)
    # qkv sees the windowed blocks' padded 70 x 70 tokens; the others the 64 x 64 image tokens.
    shapes = {"qkv": ((70, 70), 768, 2304, ""), "proj": ((64, 64), 768, 768, "residual")}
    shapes |= {"lin1": ((64, 64), 768, 3072, "gelu"), "lin2": ((64, 64), 3072, 768, "residual")}
    for name, (grid, inputs, outputs, fusion) in shapes.items():
        layer = torch.nn.Linear(inputs, outputs).to(BF16)
        quantized = Int8Linear(layer)
        x = torch.randn(1, *grid, inputs, dtype=BF16)
        residual = torch.randn(1, *grid, outputs, dtype=BF16) if fusion == "residual" else None
        calls = {
            "bf16": partial(fast_encoder._linear, x, layer, gelu=fusion == "gelu", residual=residual),
            "int8": partial(int8_linear, x, quantized, gelu=fusion == "gelu", residual=residual),
            "quantize": partial(quantize_activations, x),
        }
        seconds: dict[str, list[float]] = {key: [] for key in calls}
        for round_index in range(repeats + 1):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                if round_index:
                    seconds[key].append(time.perf_counter() - start)
        ms = {key: 1e3 * sorted(values)[len(values) // 2] for key, values in seconds.items()}
        gflop = 2 * grid[0] * grid[1] * inputs * outputs / 1e9
        print(
            f"  {name:<5} {grid[0] * grid[1]} x {inputs} -> {outputs}: bf16 {ms['bf16']:6.2f} ms "
            f"({gflop / ms['bf16'] * 1e3:5.0f}); int8 {ms['int8']:6.2f} ms ({gflop / ms['int8'] * 1e3:5.0f}), "
            f"of which quantizing {ms['quantize']:5.2f} ms; int8 GEMM alone "
            f"{gflop / (ms['int8'] - ms['quantize']) * 1e3:5.0f} GFLOP/s; x{ms['bf16'] / ms['int8']:.2f}"
        )


def compile_worker(which: str) -> None:
    """In a fresh process: torch.compile the bf16 encoder; print first-call and steady seconds."""
    encoder = reference_encoder().to(BF16)
    if which == "fast":
        accelerate_image_encoder(encoder)
    compiled = torch.compile(encoder, dynamic=False)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=BF16)
    with torch.no_grad():
        first = timed_call(lambda: compiled(image))[1]
        steady = min(timed_call(lambda: compiled(image))[1] for _ in range(3))
    print(json.dumps({"first_call_s": first, "steady_s": steady}))


def measure_compile() -> None:
    """Cold (empty FX graph / inductor cache) and warm-cache compile, each in a new process."""
    print("\ntorch.compile (inductor, dynamic=False), bf16, batch 1, each in a fresh process")
    for which in ("reference", "fast"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
            for cache_state in ("cold", "warm"):
                command = [sys.executable, "-m", "benchmarks.bench_encoder", "--compile-worker", which]
                result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                timing = json.loads(result.stdout.strip().splitlines()[-1])
                compile_s = timing["first_call_s"] - timing["steady_s"]
                print(
                    f"  {which:<9} {cache_state} cache: compile {compile_s:6.1f} s, "
                    f"then {timing['steady_s']:.2f} s per image"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--batch", type=int, default=2, help="also time this batch size in bf16; 1: skip")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes)")
    parser.add_argument("--chunk-sweep", action="store_true", help="also sweep the attention chunk size")
    parser.add_argument("--int8-layers", action="store_true", help="also time each linear layer, bf16 vs int8")
    parser.add_argument("--compile-worker", choices=("reference", "fast"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_worker:
        compile_worker(args.compile_worker)
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    reference = reference_encoder()
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))

    flops_by_op = encoder_flops(reference, image)
    flops = sum(flops_by_op.values())
    parts = ", ".join(f"{op} {count / 1e9:.0f}" for op, count in sorted(flops_by_op.items()))
    print(f"vit_b encoder at {IMAGE_SIZE}x{IMAGE_SIZE}: {flops / 1e9:.0f} GFLOP per image ({parts})")

    peaks = gemm_peaks()
    print("GEMM peak (GFLOP/s, best of 8): " + "; ".join(f"{name} {rate:.0f}" for name, rate in peaks.items()))

    chosen = variants(reference, args.batch)
    run_variants(chosen, image, args.repeats)
    # Measured again after the long runs, best kept: one competing process spoils a peak.
    peaks = {name: max(rate, peaks[name]) for name, rate in gemm_peaks().items()}
    print("GEMM peak, best of both measurements: " + "; ".join(f"{name} {rate:.0f}" for name, rate in peaks.items()))
    print()
    print_table(chosen, flops, peaks)
    if args.chunk_sweep:
        sweep_chunks(reference, image, args.repeats)
    if args.int8_layers and cpu_has_int8_dot():
        time_int8_layers(max(args.repeats, 9))
    if args.compile:
        measure_compile()


if __name__ == "__main__":
    main()
