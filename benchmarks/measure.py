"""What the benchmarks share: the vit_b they load on the CPU, a process's peak RSS, this machine's
GEMM peak, and scratch folders that go away with the benchmark."""

from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from sam_fast_serve.models.sam1.build import Precision, prepare_model, sam_model_fast_registry

BF16, FP32 = torch.bfloat16, torch.float32


def scratch_dir(prefix: str = "bench-") -> Path:
    """A new empty folder under the system temp dir, removed when the process exits: each run
    writes a 358 MB checkpoint and TorchServe work folders, which must not pile up in /tmp."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def cpu_model(checkpoint: str | Path, precision: torch.dtype | Precision | None = None) -> Sam:
    """vit_b from `checkpoint` on the CPU: as segment_anything builds it (the reference's model)
    when `precision` is None, else prepared in `precision` as a serving worker prepares it."""
    sam = sam_model_fast_registry["vit_b"](str(checkpoint))
    return sam if precision is None else prepare_model(sam, torch.device("cpu"), precision)


class PeakRss:
    """Samples the RSS of process `pid` (default: this one) every `interval` seconds while in
    use; `.start` and `.peak` in bytes."""

    def __init__(self, pid: int | None = None, interval: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        try:
            return self.process.memory_info().rss
        except psutil.Error:
            return 0

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up."""
    call()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls, no warm-up: for calls that are not all alike (a cache
    filled by the first, a different prompt each time)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_rate(call: Callable[[], object], flops: float, repeats: int = 8) -> float:
    """GFLOP/s of the fastest of `repeats` calls, after one warm-up."""
    return flops / best_seconds(call, repeats) / 1e9


def gemm_peaks() -> dict[str, float]:
    """Measured GFLOP/s: a 4096^3 aten matmul, and a (4096 x 768) @ (768 x 3072) linear (the
    MLP's shape) through aten and through oneDNN, in fp32 and bf16."""
    rates = {}
    for dtype in (FP32, BF16):
        name = "fp32" if dtype == FP32 else "bf16"
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        rates[f"{name} matmul 4096^3 (aten)"] = best_rate(partial(torch.matmul, a, b), 2 * 4096**3)
        x, w, bias = (
            torch.randn(4096, 768, dtype=dtype),
            torch.randn(3072, 768, dtype=dtype),
            torch.randn(3072, dtype=dtype),
        )
        flops = 2 * 4096 * 768 * 3072
        rates[f"{name} linear 4096x768x3072 (aten)"] = best_rate(partial(F.linear, x, w, bias), flops)
        onednn = torch.ops.mkldnn._linear_pointwise
        rates[f"{name} linear 4096x768x3072 (oneDNN)"] = best_rate(partial(onednn, x, w, bias, "none", [], ""), flops)
    return rates


def peak_for(dtype: torch.dtype, peaks: dict[str, float]) -> float:
    """The best of the `gemm_peaks` rates measured in `dtype`."""
    prefix = "fp32" if dtype == FP32 else "bf16"
    return max(rate for name, rate in peaks.items() if name.startswith(prefix))
