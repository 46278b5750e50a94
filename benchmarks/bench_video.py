"""What following an object through a video costs on this CPU: this server's video requests against
SAM 2's own SAM2VideoPredictor, per frame and in peak memory.

    python -m benchmarks.bench_video                              # sam2.1_hiera_tiny, 512 x 512 frames
    python -m benchmarks.bench_video --reference-frames 12 --frames 50
    python -m benchmarks.bench_video --costs                      # a frame's FLOPs, fp32 s, this CPU's peak

One run, one random-weight checkpoint (save_random_checkpoint, seed 0), one clip: a camera panning
over astronaut (512 x 512 frames, written as an MP4 by OpenCV), one object marked by a point on
frame 0 and tracked forward. Each case runs in a process of its own, so that its peak RSS is its own:

- reference: SAM2VideoPredictor (fp32) on the clip's frames as JPEG files (init_state reads and
  keeps them all), the first --reference-frames frames;
- ours: a video request (the MP4 and the prompt) answered by MaskService.handle in this process, as
  a worker answers it, streaming a line a frame; dtype auto (this CPU's) on each of --frames, and
  fp32 on --reference-frames.

Per frame: the median time between consecutive frames' results once the memory bank is full
(from frame STEADY on: the prompted frame and 7 memories; earlier frames attend to fewer);
first: from the call to the first frame's result. Peak RSS: the
most the process held while tracking, less what it held before the call (model loaded, clip in
memory); for the longest run also the peak by frame 10, 25, 50, ...: bounded memory stops
growing once the memory bank is full.

--costs: what bounds a frame in fp32 (where there is no native bf16, fp32 is the fast path): the
multiply-adds of a frame's two large parts, the image encoder and the memory attention over a
full memory bank (7 memories of 4096 tokens and 16 object pointers), counted by torch's
FlopCounterMode (fused attention counted as its two products, oneDNN's linear as its product) and
timed in fp32, SAM 2's modules against ours, in one process that keeps freed memory as a worker
does (server/runtime.py), beside this CPU's best fp32 matrix product (measure.gemm_peaks).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import (
    FP32,
    PeakRss,
    command_line,
    cpu_description,
    gemm_peaks,
    median_seconds,
    peak_for,
    scratch_dir,
)
from harness.files import video_file, video_frames
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.build import build_video
from sam_fast_serve.models.sam2.tracker import video_predictor
from sam_fast_serve.server.runtime import keep_freed_memory
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint

SIDE = 512
STEADY = 8
POINT = [[256, 200]]
CLIP = "clip.mp4"


def make_clip(mp4: Path, count: int) -> None:
    """The clip: `count` frames, astronaut rolled 3 pixels a frame, as an MP4."""
    photo = data.astronaut()
    mp4.write_bytes(video_file(np.stack([np.roll(photo, 3 * i, axis=1) for i in range(count)]), ".mp4", "mp4v"))


def reference(model: str, checkpoint: str, mp4: Path, frames: int, work: Path) -> dict:
    jpegs = work / "jpegs"
    jpegs.mkdir(exist_ok=True)
    for i, frame in enumerate(video_frames(mp4.read_bytes(), ".mp4")[:frames]):
        Image.fromarray(frame).save(jpegs / f"{i}.jpg", quality=95)
    predictor = build_video(model_type(model), checkpoint)
    stamps = []
    with torch.inference_mode(), PeakRss() as rss:
        start = time.perf_counter()
        state = predictor.init_state(str(jpegs))
        predictor.add_new_points_or_box(state, 0, 1, points=POINT, labels=[1])
        for _ in predictor.propagate_in_video(state):
            stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "rss": rss.peak - rss.start}


def ours(model: str, checkpoint: Path, mp4: Path, frames: int, dtype: str) -> dict:
    model_dir = checkpoint.parent
    section = {"model_type": model, "sam_checkpoint": checkpoint.name, "dtype": dtype, "max_video_frames": 100_000}
    service = MaskService.load(section, model_dir, gpu_id=None)
    document = {
        "video": base64.b64encode(mp4.read_bytes()).decode(),
        "prompts": [{"frame": 0, "object": 1, "points": POINT}],
        "frame_range": [0, frames - 1],
        "direction": "forward",
    }
    stamps: list[float] = []
    peaks: list[int] = []
    with PeakRss() as rss:
        start = time.perf_counter()

        def arrived(index: int, line: object, content_type: str) -> None:
            if '"frame":' in str(line):  # a frame's record, not what is tracked (the first line)
                stamps.append(time.perf_counter())
                peaks.append(rss.peak - rss.start)

        (reply,) = service.handle([({"body": document}, {"Accept": "application/json"})], arrived)
    assert reply.status == 200, reply.body[:300]
    return {"start": start, "stamps": stamps, "rss": rss.peak - rss.start, "peaks": peaks, "dtype": str(service.dtype)}


def _fused_attention_flops(q: list[int], k: list[int], v: list[int], *_: object, **__: object) -> int:
    """FlopCounterMode's count for the CPU's fused attention (it has none): its two products."""
    return 2 * int(np.prod(q[:-2])) * q[-2] * k[-2] * (q[-1] + v[-1])


def _onednn_linear_flops(x: list[int], weight: list[int], *_: object, **__: object) -> int:
    """FlopCounterMode's count for oneDNN's linear (it has none): x @ weight^T."""
    return 2 * int(np.prod(x[:-1])) * weight[0] * weight[1]


def frame_costs(model: str) -> None:
    """A frame's image encoder and memory attention: GFLOP and fp32 seconds (median of 3), SAM 2's
    modules and ours, and this CPU's best fp32 product; freed memory kept, as in a worker."""
    keep_freed_memory()
    theirs = build_video(model_type(model))
    mine = video_predictor(model_type(model), theirs)  # the same weights, as the server prepares them
    torch.manual_seed(0)
    side = theirs.image_size
    image = torch.randn(1, 3, side, side)
    tokens, channels, mem_dim = (side // 16) ** 2, theirs.hidden_dim, theirs.mem_dim
    pointers = 16 * channels // mem_dim
    memory = torch.randn(7 * tokens + pointers, 1, mem_dim)
    memory_pos = torch.randn_like(memory)
    current, current_pos = torch.randn(tokens, 1, channels), torch.randn(tokens, 1, channels)
    counted = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _fused_attention_flops,
        torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops,
    }
    parts = {
        "image encoder": lambda net: net.forward_image(image),
        "memory attention": lambda net: net.memory_attention(
            curr=current, memory=memory, curr_pos=current_pos, memory_pos=memory_pos, num_obj_ptr_tokens=pointers
        ),
    }
    peak = peak_for(FP32, gemm_peaks((FP32,)))
    print(f"`{command_line()}` on {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{model} in fp32, one frame; best fp32 matrix product here {peak:.0f} GFLOP/s\n")
    print("| part | SAM 2 GFLOP | SAM 2 s | ours GFLOP | ours s | ours at the peak, s |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for part, call in parts.items():
            cells = []
            for net in (theirs, mine):
                with FlopCounterMode(display=False, custom_mapping=counted) as flops:
                    call(net)
                cells.append((flops.get_total_flops() / 1e9, median_seconds(lambda net=net: call(net), 3)))
            (g_a, s_a), (g_b, s_b) = cells
            print(f"| {part} | {g_a:.0f} | {s_a:.2f} | {g_b:.0f} | {s_b:.2f} | {g_b / peak:.2f} |", flush=True)


def run_case(case: str, model: str, work: Path) -> dict:
    """One case in a fresh interpreter: its measurements as JSON on its last line."""
    command = [sys.executable, "-m", "benchmarks.bench_video", "--model", model, "--case", case, "--work", str(work)]
    ran = subprocess.run(command, capture_output=True, text=True, check=False)
    if ran.returncode:
        raise SystemExit(f"{case} failed:\n{ran.stderr[-3000:]}")
    return json.loads(ran.stdout.strip().splitlines()[-1])


def row(name: str, frames: int, measured: dict) -> str:
    stamps = measured["stamps"]
    assert len(stamps) == frames, (name, len(stamps))
    per_frame = statistics.median(np.diff(stamps[STEADY - 1 :]).tolist()) if frames > STEADY else float("nan")
    return (
        f"| {name} | {frames} | {per_frame:.3f} | {stamps[0] - measured['start']:.2f} | "
        f"{measured['rss'] / 2**20:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="50,200", help="frame counts ours tracks in dtype auto (none: '')")
    parser.add_argument(
        "--reference-frames", type=int, default=16, help="frames SAM2VideoPredictor and ours in fp32 track"
    )
    parser.add_argument("--model", default="sam2.1_hiera_tiny", help="a SAM 2 model type")
    parser.add_argument("--costs", action="store_true", help="a frame's FLOPs and fp32 seconds by part, and the peak")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.costs:
        frame_costs(args.model)
        return
    if args.case:
        kind, dtype, count = args.case.split(":")
        checkpoint = args.work / f"random_{args.model}.pt"
        if kind == "reference":
            result = reference(args.model, str(checkpoint), args.work / CLIP, int(count), args.work)
        else:
            result = ours(args.model, checkpoint, args.work / CLIP, int(count), dtype)
        print(json.dumps(result))
        return
    counts = [int(n) for n in args.frames.split(",") if n]
    work = scratch_dir("bench-video-")
    model = args.model
    save_random_checkpoint(work / f"random_{model}.pt", model, seed=0)
    n = args.reference_frames
    make_clip(work / CLIP, max([n, *counts]))
    print(f"`{command_line()}` on {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{model}, random weights, {SIDE} x {SIDE} frames, one object, forward from frame 0\n")
    print("| tracker | frames | s a frame | s to frame 0 | peak RSS over start, MiB |\n|---|---|---|---|---|")
    theirs = run_case(f"reference:float32:{n}", model, work)
    print(row("SAM2VideoPredictor, fp32", n, theirs), flush=True)
    fp32 = run_case(f"ours:float32:{n}", model, work)
    print(row("ours, fp32", n, fp32), flush=True)
    for count in counts:
        auto = run_case(f"ours:auto:{count}", model, work)
        print(row(f"ours, dtype auto ({auto['dtype'].removeprefix('torch.')})", count, auto), flush=True)
    if not counts:
        return
    marks = sorted({min(count, m) for m in (10, 25, 50, 100, 150, 200, count)})
    print(f"\nPeak RSS over start by frame, the {count}-frame run (MiB):\n")
    print("| " + " | ".join(str(m) for m in marks) + " |\n|" + "---|" * len(marks))
    print("| " + " | ".join(f"{auto['peaks'][m - 1] / 2**20:,.0f}" for m in marks) + " |")


if __name__ == "__main__":
    main()
