"""What SAM 3 costs on this CPU, and how much faster this engine serves it than transformers' pipeline.

    python -m benchmarks.bench_sam3                          # full-size sam3, astronaut and chelsea
    python -m benchmarks.bench_sam3 --model test_sam3        # a quick check on the test architecture
    python -m benchmarks.bench_sam3 --server                 # and the first concept through TorchServe

All in one process, one run, on one random-weight checkpoint folder (save_random_checkpoint, seed 0)
and the same photos. (a) the reference: transformers' Sam3Processor + Sam3Model + the processor's
post_process_instance_segmentation in float32, one phrase a call (its pipeline takes one text per
image): a first concept on a new image (processor, vision, detector, post-processing), then a
concept on that image's cached vision features (`vision_embeds`, transformers' own way to reuse
them). (b) this engine as a worker serves it: MaskService.load of a handler section (dtype auto,
and --dtypes), Engine.concepts on the image (its first concept: the vision pass), then by
image_id (the cached features), then eight phrases on a new image in one request.

Two shares of instances: random weights score every one of the 200 queries about 0.25, so SAM 3's
threshold 0.3 keeps none ("none kept": the model's work alone) and threshold 0 keeps all 200
("all kept": 200 masks upsampled and encoded a concept). The first request after the load and the
second (another new image) show whether READY means ready; the process's peak RSS is the worker's.
Each stage's FLOPs (counted from the architecture) against this CPU's measured product peak.
Prompts (a click with a box, three masks): (a) transformers' Sam3TrackerProcessor + Sam3TrackerModel
(the same weights) + post_process_masks on a new image, then on its cached `get_image_embeddings`;
(b) Engine.prompted on a new image (the photos transposed), then by image_id.
--server: the first concept of each photo through a real TorchServe against the same request in
this process, alternately (measure.request_overhead).
"""

from __future__ import annotations

import argparse
import base64
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from skimage import data as sample_images
from transformers import Sam3TrackerProcessor

from benchmarks.measure import (
    PeakRss,
    command_line,
    cpu_description,
    gemm_peaks,
    peak_for,
    request_overhead,
    scratch_dir,
)
from harness.agreement import match_instances
from harness.archives import smoke_archive
from harness.sam3 import reference_concepts, reference_prompts, reference_tracker
from harness.servers import TorchServe
from sam_fast_serve.common.concepts import parse_concepts
from sam_fast_serve.common.prompts import parse_prompts
from sam_fast_serve.models.embedding import pixel_key
from sam_fast_serve.models.precision import cpu_has_native_bf16
from sam_fast_serve.models.sam3.build import Sam3Net
from sam_fast_serve.models.sam3.predictor import Sam3Predictor
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint

PHRASES = ("person", "cat", "scratch", "nucleus", "debris", "car", "tree", "cup")
CLICK = {"points": [[150, 120]], "boxes": [[40, 30, 300, 280]], "multimask": True}
SHARES = {"none kept": 0.3, "all kept": 0.0}


def stage_flops(net: Sam3Net) -> dict[str, float]:
    """FLOPs (multiply-adds x 2) of the stages, from the architecture: the vision trunk (linears and
    attention), the detector's neck with the pixel decoder's image part and the tracker's neck, and
    one concept's detector (DETR encoder and decoder, the pixel decoder's concept part)."""
    config: Any = net.model.config
    vit = config.vision_config.backbone_config
    grid = vit.image_size // vit.patch_size
    tokens, width, mlp = grid * grid, vit.hidden_size, vit.intermediate_size
    global_layers = len(vit.global_attn_indexes)
    windowed = vit.num_hidden_layers - global_layers
    linears = vit.num_hidden_layers * 2 * tokens * (4 * width * width + 2 * width * mlp)
    attention = 4 * width * (global_layers * tokens * tokens + windowed * tokens * vit.window_size**2)
    fpn = config.vision_config.fpn_hidden_size
    # Scale 4: two 2x2 transposed convolutions, a 1x1 and a 3x3 at 4x; scale 2: one of each at 2x;
    # scale 1: a 1x1 and a 3x3. The tracker's neck (where the net has it) is another of the same.
    at = {s: tokens * s * s for s in (1, 2, 4)}
    levels = 2 * (
        at[2] * width * (width // 2) * 4 / 4 * 4
        + at[4] * (width // 2) * fpn
        + at[4] * fpn * fpn * (1 + 9)
        + at[2] * width // 2 * width * 4 / 4
        + at[2] * (width // 2) * fpn
        + at[2] * fpn * fpn * 9
        + at[1] * (width * fpn + 9 * fpn * fpn)
    )
    # The pixel decoder's 3x3 of the levels at 4x and 2x, applied with them.
    neck = levels * (1 if net.video is None else 2) + 2 * 9 * fpn * fpn * (at[4] + at[2])
    detr = config.detr_encoder_config
    hidden = detr.hidden_size
    encoder = detr.num_layers * (
        2 * tokens * (4 * hidden * hidden + 2 * hidden * detr.intermediate_size) + 4 * hidden * tokens * tokens
    )
    decoder_config = config.detr_decoder_config
    queries = decoder_config.num_queries
    decoder = (
        decoder_config.num_layers
        * 2
        * (
            queries * (8 * hidden * hidden + 2 * hidden * decoder_config.intermediate_size)
            + 2 * queries * tokens * hidden
        )
    )
    # The climb's 2x2 phase convolutions (16 taps) at 1x and 2x.
    pixel = 2 * 16 * hidden * hidden * (at[1] + at[2])
    return {"vision": linears + attention + neck, "concept": encoder + decoder + pixel}


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


@torch.inference_mode()
def reference_runs(net: Sam3Net, image: np.ndarray, threshold: float) -> dict[str, Any]:
    """(a): a first concept on `image` (the whole pipeline), then one on its cached features."""
    processor, model = net.processor, net.model
    concepts = parse_concepts({"text": PHRASES[0], "threshold": threshold})
    first, records = timed(lambda: reference_concepts(net, image, concepts))
    pixels = processor(images=image, return_tensors="pt")
    vision, features = timed(lambda: model.get_vision_features(pixel_values=pixels["pixel_values"]))

    def cached() -> Any:
        text = processor(text=PHRASES[1], return_tensors="pt")
        outputs = model(vision_embeds=features, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        return processor.post_process_instance_segmentation(outputs, threshold, 0.5, [list(image.shape[:2])])

    concept, _ = timed(cached)
    return {"first": first, "vision": vision, "cached": concept, "records": records}


def our_runs(service: MaskService, images: list[np.ndarray], threshold: float) -> dict[str, Any]:
    """(b): each image's first concept (a new image), then a concept by image_id (cached), and
    eight phrases on a new image (the first image flipped) in one request."""
    engine, cap = service.engine, service.config.max_masks
    rows: dict[str, Any] = {"first": [], "first_encoder": [], "cached": [], "records": []}
    for image in images:
        image_id = pixel_key(image)
        seconds, result = timed(
            lambda: engine.concepts(image, image_id, {"text": PHRASES[0], "threshold": threshold}, cap)
        )
        rows["first"].append(seconds)
        rows["first_encoder"].append(result.seconds["image_encoder"])
        rows["records"].append(result.payload)
        seconds, _ = timed(lambda: engine.concepts(None, image_id, {"text": PHRASES[1], "threshold": threshold}, cap))
        rows["cached"].append(seconds)
    flipped = np.ascontiguousarray(images[0][:, ::-1])
    fields = {"text": list(PHRASES), "threshold": threshold}
    rows["eight"], _ = timed(lambda: engine.concepts(flipped, pixel_key(flipped), fields, cap))
    return rows


def predictor_of(service: MaskService) -> Sam3Predictor:
    return cast(Sam3Predictor, service.engine.predictor)


def prompt_runs(service: MaskService, images: list[np.ndarray]) -> list[dict[str, float]]:
    """Per image: (a) the reference's click on it new and on its cached embeddings, (b) ours."""
    engine = service.engine
    net = predictor_of(service).net
    tracker = reference_tracker(net)
    rows = []
    for image in images:
        prompts = parse_prompts(CLICK, image.shape[:2], engine.model.mask_input_side)
        with torch.inference_mode():
            first, _ = timed(lambda: reference_prompts(net, tracker, image, prompts))
            processor = Sam3TrackerProcessor(image_processor=net.processor.image_processor)
            batch = processor(
                images=image,
                input_points=[[CLICK["points"]]],
                input_labels=[[[1]]],
                input_boxes=[CLICK["boxes"]],
                return_tensors="pt",
            )
            embeddings = tracker.get_image_embeddings(batch["pixel_values"])

            def cached_click() -> Any:
                outputs = tracker(
                    image_embeddings=embeddings,
                    input_points=batch["input_points"],
                    input_labels=batch["input_labels"],
                    input_boxes=batch["input_boxes"],
                    multimask_output=True,
                )
                return processor.post_process_masks(outputs.pred_masks, batch["original_sizes"])

            cached, _ = timed(cached_click)
        image_id = pixel_key(image)
        ours_first, _ = timed(lambda: engine.prompted(image, image_id, CLICK))
        ours_cached, _ = timed(lambda: engine.prompted(None, image_id, CLICK))
        rows.append({"first": first, "cached": cached, "ours_first": ours_first, "ours_cached": ours_cached})
        gc.collect()
    return rows


def agreement(reference: list[dict], ours: list[dict]) -> str:
    if not reference:
        return "none to match" if not ours else f"{len(ours)} extra"
    pairs = match_instances(reference, ours)
    ious = [iou for iou, _ in pairs]
    return (
        f"{len(reference)} matched, IoU min {min(ious):.4f}, >= 0.99: {np.mean(np.asarray(ious) >= 0.99):.1%}, "
        f"score diff max {max(d for _, d in pairs):.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam3", help="sam3, or test_sam3 for a quick check")
    parser.add_argument("--images", default="astronaut,chelsea")
    parser.add_argument("--dtypes", default="auto")
    parser.add_argument("--server", action="store_true")
    args = parser.parse_args()
    print(
        f"`{command_line()}`\n\nCPU: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    # bf16 where the CPU computes it natively: emulated, its peak is beside the point and takes minutes.
    peaks = gemm_peaks((torch.float32, torch.bfloat16) if cpu_has_native_bf16() else (torch.float32,))
    for name, rate in peaks.items():
        print(f"- {name}: {rate:.0f} GFLOP/s")
    work = scratch_dir("bench-sam3-")
    checkpoint = save_random_checkpoint(work / f"random_{args.model}", args.model, seed=0)
    images = [getattr(sample_images, name)() for name in args.images.split(",")]
    with PeakRss() as rss:
        services = {
            dtype: MaskService.load(
                {
                    "model_type": args.model,
                    "sam_checkpoint": checkpoint.name,
                    "dtype": dtype,
                    "embedding_cache_bytes": 1 << 30,
                },
                checkpoint.parent,
                None,
            )
            for dtype in args.dtypes.split(",")
        }
        net = predictor_of(next(iter(services.values()))).net
        flops = stage_flops(net)
        print(f"\nFLOPs: vision {flops['vision'] / 1e12:.2f} T, a concept {flops['concept'] / 1e9:.0f} G\n")
        results = []
        for turn, (share, threshold) in enumerate(SHARES.items()):
            # Each share on images no store has seen: the photos, then the photos upside down.
            photos = [image if turn == 0 else np.ascontiguousarray(image[::-1]) for image in images]
            for name, image in zip(args.images.split(","), photos, strict=True):
                reference = reference_runs(net, image, threshold)
                gc.collect()
                results.append((share, name, reference))
                print(
                    f"{share} {name} (a): first {reference['first']:.2f} s, vision {reference['vision']:.2f}, cached concept {reference['cached']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
            for dtype, service in services.items():
                ours = our_runs(service, photos, threshold)
                results.append((share, dtype, ours))
                times = {key: value for key, value in ours.items() if key != "records"}
                print(f"{share} (b) {dtype}: {times}", file=sys.stderr, flush=True)
        service = services[args.dtypes.split(",")[0]]
        # Images no earlier run has seen (the concept runs flip them): the photos transposed.
        transposed = [np.ascontiguousarray(image.transpose(1, 0, 2)) for image in images]
        prompts = prompt_runs(service, transposed) if predictor_of(service).tracker is not None else []
    print(f"\npeak RSS of this process (both pipelines, {len(services)} service(s)): {rss.peak / 2**30:.1f} GiB\n")
    report(results, args, flops, peak_for(service.dtype, peaks))
    print(
        "\n| prompts | image | (a) first | (b) first | ratio | (a) cached | (b) cached | ratio |\n|---|---|---|---|---|---|---|---|"
    )
    for name, row in zip(args.images.split(","), prompts, strict=False):
        print(
            f"| a click and a box | {name} (transposed) | {row['first']:.2f} | {row['ours_first']:.2f} | "
            f"{row['first'] / row['ours_first']:.2f}x | {row['cached']:.3f} | {row['ours_cached']:.3f} | "
            f"{row['cached'] / row['ours_cached']:.2f}x |"
        )
    if args.server:
        server_rows(checkpoint, images, services[args.dtypes.split(",")[0]])


def report(
    results: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace, flops: dict[str, float], peak: float
) -> None:
    names = args.images.split(",")
    print(
        "| share | image | (a) first | (b) first | ratio | (a) cached | (b) cached | ratio | (b) first / cached "
        "| (b) 8 concepts / 1 | agreement (fp32) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summaries = []
    for share in SHARES:
        references = {name: r for s, name, r in results if s == share and name in names}
        ours = next(r for s, name, r in results if s == share and name not in names)
        for i, name in enumerate(names):
            a, first, cached = references[name], ours["first"][i], ours["cached"][i]
            print(
                f"| {share} | {name} | {a['first']:.2f} | {first:.2f} | {a['first'] / first:.2f}x | {a['cached']:.2f} | "
                f"{cached:.2f} | {a['cached'] / cached:.2f}x | {first / cached:.1f}x | "
                f"{ours['eight'] / ours['first'][0]:.2f} | {agreement(a['records'], ours['records'][i])} |"
            )
        encoder, concept = float(np.mean(ours["first_encoder"])), float(np.mean(ours["cached"]))
        second = ours["first"][1] if len(ours["first"]) > 1 else float("nan")
        summaries.append(
            f"- {share}: (b) vision {encoder:.2f} s = {flops['vision'] / encoder / 1e9:.0f} GFLOP/s "
            f"({flops['vision'] / encoder / 1e9 / peak:.0%} of the {peak:.0f} peak); (a) vision "
            f"{np.mean([references[n]['vision'] for n in names]):.2f} s; (b) a cached concept {concept:.2f} s = "
            f"{flops['concept'] / concept / 1e9:.0f} GFLOP/s; READY: the first request {ours['first'][0]:.2f} s, "
            f"the second {second:.2f} s"
        )
    print("", *summaries, sep="\n")


def server_rows(checkpoint: Path, images: list[np.ndarray], service: MaskService) -> None:
    from harness.files import encode

    work = scratch_dir("bench-sam3-server-")
    archive = smoke_archive(work, checkpoint, startupTimeout=1800, responseTimeout=1800)
    server = TorchServe(work, archive.parent, archive.name)
    # request_overhead starts and stops the server for each image.
    for image in images:
        document = {"image": base64.b64encode(encode(image)).decode(), "text": PHRASES[2]}
        print(request_overhead(server, service, document))


if __name__ == "__main__":
    main()
