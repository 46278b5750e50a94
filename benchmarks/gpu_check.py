"""Whether this engine serves right on a GPU, in a few minutes: its masks against the references on
the same device, the peak memory of a large image, and each stage's seconds, as one table.

    python -m benchmarks.gpu_check                          # cuda:0
    python -m benchmarks.gpu_check --device cuda:1
    python -m benchmarks.gpu_check --device cpu             # a dry run, with the CPU's smaller settings
    python -m benchmarks.gpu_check --device cpu --models test_vit,test_sam2.1_hiera --points-per-side 2 \\
        --frames 2 --large-megapixels 0.3                   # the test architectures: what CI runs

Each model of --models (random weights, seed 0) is served as a worker serves it (MaskService.load
with the gpu_id of --device) in dtype float32 and in dtype auto (one row where auto is float32 on
this device), and checked against its family's own code in float32 on the same device:

- automatic: one photo (astronaut, 512 x 512), a --points-per-side grid, every mask kept (thresholds
  0, NMS off); the engine's stage seconds against the reference generator's (its image encoder and
  mask decoder calls, timed on the device's clock: models.timing.StageClock), masks paired one to one;
- prompts: harness.prompts' five requests on the photo against SamPredictor / SAM2ImagePredictor;
- image_id: a prompt by the image_id of an entry a CPU worker (float32) put in the shared embedding
  store (an in-process store answering as Redis does: the same keys and entry bytes). The key holds
  the dtype: a float32 worker reads the entry (the encoder does not run), another dtype's worker
  does not (404);
- large image: astronaut scaled to --large-megapixels, one full decoder batch (8 x 8 points; the
  grid of --points-per-side where that is smaller): the peak the request added to the device's
  memory (CUDA's allocator; on the CPU, the process's RSS), and its stage seconds;
- video (SAM 2): --frames frames of a camera panning over the photo, two objects prompted on frame 0,
  against SAM2VideoPredictor (holes filled as with its `_C` extension); seconds per frame, ours after
  a one-frame request (a worker makes its tracker once), the reference's from its init_state.

Verdicts: in float32 every mask at IoU >= 0.99 with the reference's, and the image_id rule above,
"pass" or "FAIL"; another dtype's agreement is stated. A check that raises is a FAIL with its error,
and the others still run. Exit status 1 when any row FAILs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from skimage import data

from benchmarks.bench_sam2 import reference_generator
from benchmarks.measure import PeakRss, command_line, cpu_description, scratch_dir
from harness.agreement import match_masks
from harness.archives import KEEP_ALL, random_checkpoint_name
from harness.components import sam2_labelled_by_scipy
from harness.devices import checked_device, gpu_id
from harness.files import clip_pixels, encode, pan_clip, tiff
from harness.prompts import CASES, reference_answer
from sam_fast_serve.models.engine import warm_up_image, warm_up_settings
from sam_fast_serve.models.precision import resolve_dtype
from sam_fast_serve.models.registry import SAM2, ModelType, model_type
from sam_fast_serve.models.sam2.build import build_video
from sam_fast_serve.models.timing import StageClock
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.server.store import RedisEmbeddings
from sam_fast_serve.tools.cli import save_random_checkpoint

# Settings by device type: a GPU's, and the CPU dry run's (a few minutes on 2 cores).
DEFAULTS = {
    "cuda": {"points_per_side": 16, "frames": 8, "large_megapixels": 12.0},
    "cpu": {"points_per_side": 4, "frames": 2, "large_megapixels": 1.0},
}
# The large image's grid at most: one decoder batch of the default 64 points, whose masks are the
# request's peak.
LARGE_POINTS_PER_SIDE = 8
# A Redis URL for the config; no connection is made (the workers' store client is a SharedDict).
STORE_URL = "redis://127.0.0.1:1/0"
# The image_id check's click, on chelsea (a photo no worker has seen before it).
CLICK = {"points": [[200, 150]]}
VIDEO_PROMPTS = [
    {"frame": 0, "object": 1, "points": [[80, 60]], "labels": [1]},
    {"frame": 0, "object": 7, "boxes": [[20, 20, 100, 90]]},
]
COLUMNS = (
    "model",
    "dtype",
    "check",
    "agreement with the reference",
    "verdict",
    "ours s (encoder / decoder / rest)",
    "reference s (encoder / decoder / rest)",
    "peak memory",
)


@dataclass
class Row:
    """One line of the table (COLUMNS)."""

    model: str
    dtype: str
    check: str
    agreement: str = "-"
    verdict: str = "-"
    ours: str = "-"
    reference: str = "-"
    memory: str = "-"

    def line(self) -> str:
        return "| " + " | ".join(dataclasses.astuple(self)) + " |"


class SharedDict:
    """The two Redis commands RedisEmbeddings sends, answered from one dict that every worker of the
    run shares: the shared store's keys and entry bytes, without a Redis server."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.entries.get(key)

    def set(self, key: str, value: bytes, ex: int | None = None) -> None:
        self.entries[key] = value


def load_worker(
    name: str, checkpoint: Path, dtype: str, device: torch.device, points_per_side: int, shared: SharedDict
) -> MaskService:
    """A worker of `name` on `device` in `dtype`, keep-all on a `points_per_side` grid, its shared
    embedding store `shared`."""
    section = {
        "model_type": name,
        "sam_checkpoint": checkpoint.name,
        "dtype": dtype,
        "points_per_side": points_per_side,
        "embedding_store": STORE_URL,
        **KEEP_ALL,
    }
    service = MaskService.load(section, checkpoint.parent, gpu_id(device))
    store = service.engine.store.shared
    assert isinstance(store, RedisEmbeddings)
    store.client = shared
    return service


def ask(service: MaskService, document: Mapping[str, Any]) -> tuple[int, Any]:
    """(status, the JSON answer) of one request."""
    reply = service.handle([({"body": dict(document)}, {"Accept": "application/json"})])[0]
    return reply.status, json.loads(reply.body)


def as_base64(image: np.ndarray) -> str:
    """An RGB image as a request's "image" field (PNG, base64)."""
    return base64.b64encode(encode(image)).decode()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1 for two empty ones)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def decoded(record: Mapping[str, Any]) -> np.ndarray:
    """The boolean mask of a record's COCO RLE (JSON form)."""
    return mask_utils.decode(dict(record["segmentation"])).astype(bool)


def summary(ious: list[float], what: str = "masks") -> str:
    """The agreement cell: how many `what`, the shares at IoU >= 0.99 and >= 0.9, the worst."""
    values = np.asarray(ious)
    if not len(values):
        return f"no {what}"
    return (
        f"{len(values)} {what}: {(values >= 0.99).mean():.1%} >= 0.99, {(values >= 0.9).mean():.1%} >= 0.9, "
        f"min {values.min():.3f}"
    )


def verdict(dtype: torch.dtype, passed: bool) -> str:
    """float32 is held to the reference; another dtype's agreement is stated."""
    if dtype != torch.float32:
        return "stated"
    return "pass" if passed else "FAIL"


def seconds(encoder: float, decoder: float, rest: float) -> str:
    """A seconds cell: encoder / decoder / rest."""
    return f"{encoder:.3f} / {decoder:.3f} / {rest:.3f}"


def ours_seconds(stages: Mapping[str, float]) -> str:
    """The engine's stage seconds of one image (models.engine); rest includes the embedding store."""
    return seconds(stages["image_encoder"], stages["mask_decoder"], stages["postprocess"] + stages["embedding_store"])


def held(device: torch.device) -> int:
    """Bytes `device` holds now: CUDA's allocator's on a GPU, the process's RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def peak_growth(device: torch.device, call: Callable[[], Any]) -> tuple[Any, int]:
    """`call()`'s result and the most it added to what `device` held, in bytes: CUDA's allocator on a
    GPU, the process's RSS (sampled) on the CPU."""
    if device.type != "cuda":
        with PeakRss() as rss:
            result = call()
        return result, rss.peak - rss.start
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - start


@contextlib.contextmanager
def clocked(clock: StageClock, stage: str, owner: Any, attr: str) -> Iterator[None]:
    """owner.attr's calls timed as `stage` on `clock` while inside the block."""
    original = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with clock.stage(stage):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def reference_parts(model: ModelType, net: Any) -> dict[str, tuple[Any, str]]:
    """The reference's image encoder and mask decoder calls, (owner, attribute) by stage: SAM 2's
    forward_image runs the decoder's high-resolution convolutions too, as the engine's encoder stage does."""
    if model.family is SAM2:
        return {"encoder": (net, "forward_image"), "decoder": (net.sam_mask_decoder, "forward")}
    return {"encoder": (net.image_encoder, "forward"), "decoder": (net.mask_decoder, "forward")}


def reference_seconds(model: ModelType, generator: Any, image: np.ndarray) -> tuple[list[dict[str, Any]], str]:
    """The reference generator's records for `image`, and its seconds by stage (reference_parts) and
    the rest, on its device's clock."""
    net = generator.predictor.model
    clock = StageClock(net.device)
    with contextlib.ExitStack() as parts:
        for stage, (owner, attr) in reference_parts(model, net).items():
            parts.enter_context(clocked(clock, stage, owner, attr))
        start = time.perf_counter()
        records = generator.generate(image)
        elapsed = time.perf_counter() - start
    stages = clock.take()
    spent = stages.get("encoder", 0.0), stages.get("decoder", 0.0)
    return records, seconds(*spent, elapsed - sum(spent))


def check_automatic(
    model: ModelType, reference: Any, workers: dict[str, MaskService], image: np.ndarray, grid: int
) -> list[Row]:
    """Every worker's automatic masks of `image` against the reference generator's."""
    expected, reference_cells = reference_seconds(model, reference, image)
    rows = []
    for label, service in workers.items():
        (result,) = service.engine.automatic([image], service.config.amg)
        ious, unmatched, leftover = match_masks(expected, result.payload)
        extra = f", {unmatched} unpaired, {leftover} extra" if unmatched or leftover else ""
        passed = not unmatched and not leftover and min(ious, default=1.0) >= 0.99
        check = f"automatic {grid}x{grid}, keep-all"
        rows.append(
            Row(
                model.name,
                label,
                check,
                summary(ious) + extra,
                verdict(service.dtype, passed),
                ours_seconds(result.seconds),
                reference_cells,
            )
        )
    return rows


def reference_prompt_masks(predictor: Any, case: Mapping[str, Any], multimask: bool) -> tuple[np.ndarray, np.ndarray]:
    """(masks (B, C, H, W) bool, scores (B, C)) of one request's prompts from the family's predictor."""
    if isinstance(predictor, SamPredictor):
        return reference_answer(predictor, dict(case), multimask)
    points = np.asarray(case["points"]) if "points" in case else None
    labels = np.asarray(case.get("labels", [1] * len(case["points"]))) if "points" in case else None
    boxes = np.asarray(case["boxes"]) if "boxes" in case else None
    masks, scores, _ = predictor.predict(points, labels, boxes, multimask_output=multimask)
    count = len(boxes) if boxes is not None else 1
    return masks.reshape(count, -1, *masks.shape[-2:]) > 0, scores.reshape(count, -1)


def check_prompts(model: ModelType, predictor: Any, workers: dict[str, MaskService], image: np.ndarray) -> list[Row]:
    """Every worker's answers to harness.prompts' requests against the family's predictor."""
    predictor.set_image(image)
    pixels = as_base64(image)
    ious: dict[str, list[float]] = {label: [] for label in workers}
    scores: dict[str, list[float]] = {label: [] for label in workers}
    for name, case in CASES.items():
        multimask = name == "single point"
        expected, expected_scores = reference_prompt_masks(predictor, case, multimask)
        for label, service in workers.items():
            status, answer = ask(service, {"image": pixels, "multimask": multimask, **case})
            assert status == 200, answer
            for prompt, masks, prompt_scores in zip(answer["prompts"], expected, expected_scores, strict=True):
                for record, mask, score in zip(prompt["masks"], masks, prompt_scores, strict=True):
                    ious[label].append(iou(decoded(record), mask))
                    scores[label].append(abs(record["predicted_iou"] - float(score)))
    return [
        Row(
            model.name,
            label,
            f"prompts ({len(CASES)} requests)",
            f"{summary(ious[label])}; score diff max {max(scores[label]):.1e}",
            verdict(service.dtype, min(ious[label]) >= 0.99),
        )
        for label, service in workers.items()
    ]


def check_image_id(model: ModelType, cpu_worker: MaskService, workers: dict[str, MaskService]) -> list[Row]:
    """A prompt by the image_id of the CPU worker's entry in the shared store, on every worker."""
    photo = data.chelsea()
    status, direct = ask(cpu_worker, {"image": as_base64(photo), **CLICK})
    assert status == 200, direct
    rows = []
    for label, service in workers.items():
        calls = service.engine.predictor.encoder_calls
        status, by_id = ask(service, {"image_id": direct["image_id"], **CLICK})
        if service.dtype == torch.float32:
            pairs = (
                zip(by_id["prompts"][0]["masks"], direct["prompts"][0]["masks"], strict=True) if status == 200 else ()
            )
            ious = [iou(decoded(ours), decoded(theirs)) for ours, theirs in pairs]
            encoded = service.engine.predictor.encoder_calls - calls
            agreement = f"{status}, encoder runs {encoded}; against the CPU worker's answer: {summary(ious)}"
            passed = status == 200 and not encoded and min(ious, default=0.0) >= 0.99
        else:
            agreement = f"{status}: the CPU worker's float32 entry is not read (the key holds {service.dtype})"
            passed = status == 404
        rows.append(Row(model.name, label, "image_id of a CPU worker's entry", agreement, "pass" if passed else "FAIL"))
    return rows


def large_image(megapixels: float) -> np.ndarray:
    """astronaut scaled to about `megapixels`, 4:3."""
    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    return np.asarray(Image.fromarray(data.astronaut()).resize((width, width * 3 // 4)))


def check_large_image(
    model: ModelType,
    workers: dict[str, MaskService],
    loaded: Mapping[str, int],
    image: np.ndarray,
    device: torch.device,
) -> list[Row]:
    """Every worker's peak memory and stage seconds on `image`, one decoder batch of points at most;
    `loaded`: what each worker held once loaded, by row label."""
    rows = []
    megapixels = image.shape[0] * image.shape[1] / 1e6
    for label, service in workers.items():
        grid = min(LARGE_POINTS_PER_SIDE, service.config.amg.points_per_side)
        settings = dataclasses.replace(service.config.amg, points_per_side=grid)
        (result,), peak = peak_growth(device, lambda: service.engine.automatic([image], settings))
        check = f"{megapixels:.1f} MP image, {grid}x{grid}"
        memory = f"+{peak / 2**30:.2f} GiB over the loaded {loaded[label] / 2**30:.2f} GiB"
        rows.append(
            Row(model.name, label, check, f"{result.masks} masks", "-", ours_seconds(result.seconds), "-", memory)
        )
    return rows


def reference_video(
    model: ModelType, checkpoint: Path, folder: Path, device: torch.device
) -> tuple[dict[tuple[int, int], np.ndarray], float]:
    """SAM2VideoPredictor on the JPEG frames of `folder`, on `device`, holes filled as with its `_C`
    extension: each (frame, object)'s mask, and the seconds per frame."""
    predictor = build_video(model, str(checkpoint)).to(device)
    masks = {}
    start = time.perf_counter()
    with torch.inference_mode(), sam2_labelled_by_scipy():
        state = predictor.init_state(str(folder))
        for prompt in VIDEO_PROMPTS:
            box = prompt["boxes"][0] if "boxes" in prompt else None
            points, labels = prompt.get("points"), prompt.get("labels")
            predictor.add_new_points_or_box(
                state, prompt["frame"], prompt["object"], points=points, labels=labels, box=box
            )
        for frame, ids, logits in predictor.propagate_in_video(state):
            for obj, mask in zip(ids, logits[:, 0] > 0, strict=True):
                masks[frame, obj] = mask.cpu().numpy()
    return masks, (time.perf_counter() - start) / state["num_frames"]


def track(service: MaskService, document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The frames' records of a video request's answer (common.tracks), streamed as to TorchServe."""
    lines: list[Any] = []
    (reply,) = service.handle(
        [({"body": dict(document)}, {"Accept": "application/json"})], lambda i, line, _: lines.append(line)
    )
    assert reply.status == 200, reply.body
    return [json.loads(line) for line in lines if '"frame":' in str(line)]


def check_video(
    model: ModelType, checkpoint: Path, workers: dict[str, MaskService], frames: int, device: torch.device
) -> list[Row]:
    """Every worker's video answer (a TIFF of the clip's frames) against SAM2VideoPredictor's."""
    folder = pan_clip(data.astronaut(), scratch_dir(prefix="gpu-check-clip-"), frames)
    expected, reference_per_frame = reference_video(model, checkpoint, folder, device)
    document = {
        "video": base64.b64encode(tiff(clip_pixels(folder, frames))).decode(),
        "prompts": VIDEO_PROMPTS,
        "direction": "forward",
    }
    rows = []
    for label, service in workers.items():
        track(service, {**document, "frame_range": [0, 0]})
        start = time.perf_counter()
        records = track(service, document)
        per_frame = (time.perf_counter() - start) / frames
        ious = [
            iou(decoded(obj), expected[record["frame"], obj["object"]])
            for record in records
            for obj in record["objects"]
        ]
        passed = len(ious) == len(expected) and min(ious, default=0.0) >= 0.99
        rows.append(
            Row(
                model.name,
                label,
                f"video, {frames} frames, 2 objects",
                summary(ious, "frame masks"),
                verdict(service.dtype, passed),
                f"{per_frame:.3f} per frame",
                f"{reference_per_frame:.3f} per frame",
            )
        )
    return rows


def guarded(rows: list[Row], model: str, check: str, run: Callable[[], list[Row]]) -> None:
    """The rows of `run`, or one FAIL row with its error: a check that fails leaves the others to run."""
    try:
        rows += run()
    except Exception as exc:  # the table reports it; the other checks still run
        rows.append(Row(model, "-", check, f"{type(exc).__name__}: {str(exc)[:200]}", "FAIL"))


def dtype_rows(device: torch.device) -> dict[str, str]:
    """Row label -> the handler's dtype value: float32, and auto where it is not float32 here."""
    auto = resolve_dtype("auto", device)
    if auto == torch.float32:
        return {"float32 (= auto)": "float32"}
    return {"float32": "float32", f"{str(auto).removeprefix('torch.')} (auto)": "auto"}


def check_model(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> list[Row]:
    """Every check of one model type, its workers and references loaded on `device`."""
    model = model_type(name)
    checkpoint = save_random_checkpoint(work / random_checkpoint_name(name), name, seed=0)
    shared = SharedDict()
    workers, loaded = {}, {}
    for label, dtype in dtype_rows(device).items():
        before = held(device)
        workers[label] = load_worker(name, checkpoint, dtype, device, args.points_per_side, shared)
        loaded[label] = held(device) - before
    cpu_worker = load_worker(name, checkpoint, "float32", torch.device("cpu"), args.points_per_side, shared)
    net = model.family.code().build(model, str(checkpoint)).to(device)
    reference = reference_generator(model, net, next(iter(workers.values())).config.amg)
    if device.type == "cuda":  # its first call loads CUDA's libraries and kernels; the workers warmed up at load
        reference_generator(model, net, warm_up_settings(model.family)).generate(warm_up_image())
    photo = data.astronaut()
    rows: list[Row] = []
    grid = args.points_per_side
    guarded(rows, name, "automatic", lambda: check_automatic(model, reference, workers, photo, grid))
    guarded(rows, name, "prompts", lambda: check_prompts(model, reference.predictor, workers, photo))
    guarded(rows, name, "image_id", lambda: check_image_id(model, cpu_worker, workers))
    big = large_image(args.large_megapixels)
    guarded(rows, name, "large image", lambda: check_large_image(model, workers, loaded, big, device))
    if model.family.video:
        guarded(rows, name, "video", lambda: check_video(model, checkpoint, workers, args.frames, device))
    return rows


def device_line(device: torch.device) -> str:
    """What the run ran on, for the report's first line."""
    if device.type != "cuda":
        return f"{cpu_description()}, {torch.get_num_threads()} threads (a dry run: no GPU)"
    properties = torch.cuda.get_device_properties(device)
    tf32 = "on" if torch.backends.cudnn.allow_tf32 else "off"
    return (
        f"{device}: {properties.name}, compute capability {properties.major}.{properties.minor}, "
        f"{properties.total_memory / 2**30:.0f} GiB; TF32 convolutions {tf32} (float32 rows, ours and the references')"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0", help="cuda[:index], or cpu for a dry run")
    parser.add_argument("--models", default="vit_b,sam2.1_hiera_tiny", help="model types, comma-separated")
    parser.add_argument("--points-per-side", type=int, help="the automatic check's grid (GPU 16, CPU 4)")
    parser.add_argument("--frames", type=int, help="the video's frames (GPU 8, CPU 2)")
    parser.add_argument("--large-megapixels", type=float, help="the large image's size (GPU 12, CPU 1)")
    args = parser.parse_args()
    device = checked_device(args.device)
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    started = time.perf_counter()
    print(f"# gpu_check on {device_line(device)}; torch {torch.__version__}")
    print(f"# {command_line()}")
    if device.type == "cpu":
        print(f"# a dry run: the large image is {args.large_megapixels:g} MP (12 MP on a GPU), memory is the RSS")
    work = scratch_dir(prefix="gpu-check-")
    rows = []
    for name in args.models.split(","):
        rows += check_model(name, args, device, work)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    print("\n".join(row.line() for row in rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    sys.exit(1 if any(row.verdict == "FAIL" for row in rows) else 0)


if __name__ == "__main__":
    main()
