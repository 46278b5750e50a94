"""What the benchmarks share: scratch folders that go away with the benchmark, what a report names
(its command line, this CPU and its class, dtypes), the vit_b they load on the CPU, a process's
peak RSS, this machine's GEMM peak, the stage timing of the reference and engine generators and the
agreement of their masks, archives with the repo's model-config.yaml and the images sent to them,
and a request through TorchServe against the same request answered in this process."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
import segment_anything.automatic_mask_generator as reference_module
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything.modeling import Sam
from skimage import data as sample_images

from harness.agreement import match_masks
from harness.files import encode
from harness.servers import REPO, TorchServe
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.common.wire import decode_pickled, encode_pickled
from sam_fast_serve.models import amg as engine_amg
from sam_fast_serve.models.precision import Precision, cpu_flags
from sam_fast_serve.models.registry import sam_model_fast_registry
from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
from sam_fast_serve.models.sam1.build import prepare_model
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.archive import build_archive

BF16, FP32 = torch.bfloat16, torch.float32
CPU = torch.device("cpu")
# How the tables name a dtype.
SHORT_NAMES = {BF16: "bf16", FP32: "fp32", torch.float16: "fp16"}
# The row every ratio is taken against (segment_anything's own generator in fp32).
REFERENCE = "(a) reference fp32"
STAGES = ("encoder", "decoder", "upsample", "rle")
# The client as installed beside this interpreter.
CLIENT = Path(sys.executable).parent / "sam-fast-client"


def scratch_dir(prefix: str = "bench-") -> Path:
    """A new empty folder under the system temp dir, removed when the process exits: each run
    writes a 358 MB checkpoint and TorchServe work folders, which must not pile up in /tmp."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def command_line() -> str:
    """How this benchmark was started, to be run again: `python -m <module> <arguments>` (or the
    script's path where it was run as a file)."""
    spec = sys.modules["__main__"].__spec__
    started = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join([os.path.relpath(sys.executable), *started, *sys.argv[1:]])


def cpu_model(checkpoint: str | Path, precision: torch.dtype | Precision | None = None) -> Sam:
    """vit_b from `checkpoint` on the CPU: as segment_anything builds it (the reference's model)
    when `precision` is None, else prepared in `precision` as a serving worker prepares it."""
    sam = sam_model_fast_registry["vit_b"](str(checkpoint))
    return sam if precision is None else prepare_model(sam, CPU, precision)


def cpu_description() -> str:
    """This CPU's model name (lscpu) and its class for our dtypes: whether it computes bf16
    natively (AVX-512 BF16, AMX), which is what dtype auto decides by."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:")), "unknown CPU")
    flags = cpu_flags()
    if "amx_bf16" in flags:
        isa = "AMX"
    elif "avx512_bf16" in flags:
        isa = "AVX-512 with bf16"
    elif "avx512f" in flags:
        isa = "AVX-512 without bf16"
    else:
        isa = "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


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


def gemm_peaks(dtypes: tuple[torch.dtype, ...] = (FP32, BF16)) -> dict[str, float]:
    """Measured GFLOP/s: a 4096^3 aten matmul, and a (4096 x 768) @ (768 x 3072) linear (the
    MLP's shape) through aten and through oneDNN, in each of `dtypes` (fp32, bf16)."""
    rates = {}
    for dtype in dtypes:
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


@contextlib.contextmanager
def timed(totals: dict[str, float], stage: str, owner: Any, attr: str) -> Iterator[None]:
    """Add the time spent in owner.attr to totals[stage] while inside the block."""
    original = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[stage] += time.perf_counter() - started

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def reference_stages(generator: ReferenceGenerator, totals: dict[str, float]) -> contextlib.ExitStack:
    """STAGES of segment_anything's generator, timed where its own functions are called."""
    sam = generator.predictor.model
    stack = contextlib.ExitStack()
    stack.enter_context(timed(totals, "encoder", sam.image_encoder, "forward"))
    stack.enter_context(timed(totals, "decoder", sam.mask_decoder, "forward"))
    stack.enter_context(timed(totals, "upsample", sam, "postprocess_masks"))
    stack.enter_context(timed(totals, "rle", reference_module, "mask_to_rle_pytorch"))
    stack.enter_context(timed(totals, "rle", reference_module, "coco_encode_rle"))
    return stack


def engine_stages(generator: SamAutomaticMaskGenerator, totals: dict[str, float]) -> contextlib.ExitStack:
    """STAGES of this engine's SAM 1 generator, timed where its functions are called."""
    sam = generator.predictor.model
    decoder = generator.predictor.decoder
    stack = contextlib.ExitStack()
    stack.enter_context(timed(totals, "encoder", sam.image_encoder, "forward"))
    for attr in ("prepare_image", "run_transformer", "mask_logits"):
        stack.enter_context(timed(totals, "decoder", decoder, attr))
    stack.enter_context(timed(totals, "upsample", generator.predictor, "upsample"))
    stack.enter_context(timed(totals, "rle", engine_amg, "start_rles"))
    return stack


def run_variant(
    name: str,
    make: Callable[[Any], Any],
    stages: Callable[[Any, dict[str, float]], AbstractContextManager[Any]],
    images: list[np.ndarray],
    settings: Sequence[Any],
    stage_names: tuple[str, ...] = STAGES,
) -> dict[str, Any]:
    """Time `make(settings[i]).generate(images[i])` for every image, with the seconds that
    `stages(generator, totals)` adds to totals[stage] while it is entered; then the wire encoding.
    Seconds per image of the whole and of each of `stage_names`; "post" is what those leave."""
    totals: dict[str, float] = defaultdict(float)
    outputs = []
    total = 0.0
    gc.collect()
    with PeakRss() as rss:
        for image, kwargs in zip(images, settings, strict=True):
            generator = make(kwargs)
            with stages(generator, totals):
                started = time.perf_counter()
                outputs.append(generator.generate(image))
                total += time.perf_counter() - started
    wire_started = time.perf_counter()
    bodies = [encode_pickled(anns) for anns in outputs]
    totals["wire"] = time.perf_counter() - wire_started
    n = len(images)
    return {
        "name": name,
        "total": total / n,
        **{stage: totals[stage] / n for stage in stage_names},
        "post": (total - sum(totals[s] for s in stage_names)) / n,
        "wire": totals["wire"] / n,
        "rss": rss.peak,
        "bytes": sum(len(b) for b in bodies) / n,
        "masks": sum(len(o) for o in outputs) / n,
        "outputs": outputs,
    }


def agreement(reference: dict[str, Any], row: dict[str, Any]) -> str:
    """How the masks of `row` match those of `reference` one to one (harness.agreement), over all
    images of their "outputs": the shares at IoU >= 0.9 and >= 0.99, the worst, the unpaired."""
    ious: list[float] = []
    unmatched = leftover = 0
    for ref, ours in zip(reference["outputs"], row["outputs"], strict=True):
        i, u, left = match_masks(ref, ours)
        ious += i
        unmatched += u
        leftover += left
    if not ious:
        return "n/a (no masks)" if not leftover else f"{leftover} extra"
    ious_a = np.array(ious)
    return f"{(ious_a >= 0.9).mean():.1%} >=0.9, {(ious_a >= 0.99).mean():.1%} >=0.99, min {ious_a.min():.3f}" + (
        f", {unmatched} unmatched, {leftover} extra" if unmatched or leftover else ""
    )


def repo_archive(checkpoint: Path, work: Path, batch_size: int | None = None, **handler: Any) -> Path:
    """An archive of `checkpoint` with the repo's model-config.yaml, `batch_size` and `handler` keys
    changed (the config written as work/model-config.yaml, the archive in work/model_store)."""
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    if batch_size is not None:
        config["batchSize"] = batch_size
    config["handler"].update(sam_checkpoint=checkpoint.name, **handler)
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    return build_archive(REPO / "custom_handler.py", checkpoint, work / "model-config.yaml", work / "model_store")


def make_images(folder: Path, count: int, side: int = 512) -> None:
    """`count` PNGs of side x side in `folder`, each with pixels of its own: scikit-image photos
    cropped to a square, resized, and rolled by a different offset."""
    photos = [sample_images.astronaut(), sample_images.chelsea(), sample_images.coffee(), sample_images.rocket()]
    squares = []
    for rgb in photos:
        crop = min(rgb.shape[:2])
        squares.append(np.asarray(Image.fromarray(rgb[:crop, :crop]).resize((side, side))))
    folder.mkdir(parents=True)
    for i in range(count):
        rolled = np.roll(squares[i % len(squares)], 17 * (i // len(squares)) + 1, axis=1)
        (folder / f"image{i:04d}.png").write_bytes(encode(np.ascontiguousarray(rolled)))


# Requests of each kind whose median a TorchServe row reports, sent alternately: on a VM whose
# figures vary by 10-30% between runs, one request of each could not show a 10% difference.
REPEATS = 3

# The columns `Overhead.cells` fills.
OVERHEAD_COLUMNS = (
    f"masks | response bytes | TorchServe, first request after READY | TorchServe, later (median of {REPEATS}) "
    f"| in process (median of {REPEATS}) | TorchServe / in process | first / later"
)


@dataclass(frozen=True)
class Overhead:
    """Seconds of one JSON request through TorchServe (the first after READY, then the later ones)
    and of the same request answered by a MaskService in this process, alternately; the response."""

    first: float
    later: tuple[float, ...]
    in_process: tuple[float, ...]
    body: bytes

    def cells(self) -> str:
        """The OVERHEAD_COLUMNS cells of a markdown row (medians, each with its range)."""
        later, in_process = statistics.median(self.later), statistics.median(self.in_process)
        return (
            f"{len(decode_pickled(self.body))} | {len(self.body):,} | {self.first:.2f} s "
            f"| {later:.2f} s ({spread(self.later)}) | {in_process:.2f} s ({spread(self.in_process)}) "
            f"| {later / in_process:.3f} | {self.first / later:.3f}"
        )


def spread(seconds: Sequence[float]) -> str:
    """The range of `seconds`, e.g. "9.81-10.40"."""
    return f"{min(seconds):.2f}-{max(seconds):.2f}"


def request_overhead(server: TorchServe, service: MaskService, document: dict[str, Any]) -> Overhead:
    """Start `server` afresh and send it `document`: the first request after READY; then REPEATS
    times the same request through TorchServe and to `service` (loaded from the same handler
    section, so the two differ only in TorchServe: its frontend, the worker's IPC and the HTTP
    transfer), alternately so that a slow spell of the machine falls on both; then stop it."""
    url = f"{server.inference_url}/predictions/{MODEL_NAME}"

    def over_http() -> tuple[float, bytes]:
        started = time.perf_counter()
        reply = requests.post(url, json=document, headers=server.auth(), timeout=900)
        reply.raise_for_status()
        return time.perf_counter() - started, reply.content

    def in_process() -> float:
        started = time.perf_counter()
        (reply,) = service.handle([({"body": document}, {})])
        assert reply.status == 200, reply.body
        return time.perf_counter() - started

    in_process()  # what this request's first answer in this process pays is not TorchServe's
    server.start()
    try:
        first, body = over_http()
        later, local = [], []
        for _ in range(REPEATS):
            later.append(over_http()[0])
            local.append(in_process())
    finally:
        server.stop()
    return Overhead(first, tuple(later), tuple(local), body)
