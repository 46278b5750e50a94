"""What SAM 2.1 costs on this CPU, and how much faster this engine serves it than SAM 2's own generator.

    python -m benchmarks.bench_sam2                           # hiera tiny and base_plus, vit_b beside them
    python -m benchmarks.bench_sam2 --dtypes auto,float32     # ours in fp32 too
    python -m benchmarks.bench_sam2 --server                  # and each (model, share) through TorchServe
    python -m benchmarks.bench_sam2 --models test_sam2.1_hiera,test_vit --points-per-side 4 \\
        --images astronaut --shares 0.3,all                   # a quick check on the test architectures

All in one run, on the same random-weight checkpoints (save_random_checkpoint, seed 0) and the same
photos. For each model of --models: (a) its family's own automatic mask generator in fp32 on the
model as the family builds it (SAM 2's SAM2AutomaticMaskGenerator for the hiera models;
segment_anything's SamAutomaticMaskGenerator for vit_b, the SAM 1 model beside them for
comparison), and (b) this engine as a worker serves it: MaskService.load of a handler section in
dtype auto (the dtype this CPU gets; --dtypes adds rows in others), one Engine.automatic call per
image, embedding cache off so that every call runs the image encoder. Both warm up first as a
worker does (models.engine's warm-up image and settings).

At each kept share of --shares (benchmarks/shares.py: `pred_iou_thresh` at the quantile of each
image's predicted IoUs that lets that share of its (point, mask) pairs through, stability filter
off, NMS on; "all": thresholds 0 and NMS off) the same settings go to every row. Seconds per image
are of the whole generation and by stage: for (b) the engine's own stage clock; for (a) its image
encoder and mask decoder calls, wrapped; "rest" is what those leave (upsampling, filters, NMS, RLE,
records; for (b) also the embedding store's lookups). Masks are matched one to one with (a)
(harness.agreement).

--server: each model's first image at each share through a real TorchServe, started afresh from an
archive of the smoke config (tests/smoke-config.yaml) with this run's handler section, in dtype
auto: the first request after READY, then the same request through TorchServe and answered in
this process by (b)'s service, alternately (measure.request_overhead).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from segment_anything import SamAutomaticMaskGenerator
from skimage import data as sample_images

from benchmarks.measure import (
    CPU,
    OVERHEAD_COLUMNS,
    REFERENCE,
    SHORT_NAMES,
    agreement,
    command_line,
    cpu_description,
    request_overhead,
    run_variant,
    scratch_dir,
    timed,
)
from benchmarks.shares import predicted_ious, sweep_setting
from harness.archives import smoke_archive
from harness.files import encode
from harness.servers import TorchServe
from sam_fast_serve.common.options import AmgSettings, apply_request_options
from sam_fast_serve.models.engine import Engine, warm_up_image, warm_up_settings
from sam_fast_serve.models.precision import resolve_precision
from sam_fast_serve.models.registry import SAM2, ModelType, model_type
from sam_fast_serve.models.timing import ENGINE_STAGES
from sam_fast_serve.server.runtime import keep_freed_memory
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint

# The stages timed in both rows, by the engine's names; the rest is what they leave of the whole.
TIMED_STAGES = tuple(stage for stage in ENGINE_STAGES if stage != "postprocess")


def reference_generator(model: ModelType, net: Any, settings: AmgSettings) -> Any:
    """The family's own generator on `net` with `settings`, giving records as the service does."""
    generator = SAM2AutomaticMaskGenerator if model.family is SAM2 else SamAutomaticMaskGenerator
    return generator(net, **settings.generator_arguments(model.family.amg_keys), output_mode="coco_rle")


def reference_clock(generator: Any, totals: dict[str, float]) -> contextlib.ExitStack:
    """The reference's image encoder and mask decoder calls, timed under the engine's stage names."""
    net = generator.predictor.model
    stack = contextlib.ExitStack()
    if isinstance(generator, SAM2AutomaticMaskGenerator):
        # SAM2ImagePredictor.set_image runs the backbone and the decoder's high-resolution
        # convolutions in forward_image, as the engine's encoder stage does.
        stack.enter_context(timed(totals, "image_encoder", net, "forward_image"))
        stack.enter_context(timed(totals, "mask_decoder", net.sam_mask_decoder, "forward"))
    else:
        stack.enter_context(timed(totals, "image_encoder", net.image_encoder, "forward"))
        stack.enter_context(timed(totals, "mask_decoder", net.mask_decoder, "forward"))
    return stack


class Served:
    """The engine as a generator of one set of settings, as the service runs it: `generate` is one
    Engine.automatic call for one image; `seconds` are the engine's stage seconds of the last."""

    def __init__(self, engine: Engine, settings: AmgSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.seconds: dict[str, float] = {}

    def generate(self, image: np.ndarray) -> Any:
        (result,) = self.engine.automatic([image], self.settings)
        # A cached embedding would skip the encoder and time a different path.
        assert result.seconds["image_encoder"] > 0.0, "the image encoder did not run: is the embedding cache on?"
        self.seconds = result.seconds
        return result.payload


@contextlib.contextmanager
def engine_clock(generator: Served, totals: dict[str, float]) -> Iterator[None]:
    """Add the engine's stage seconds of the call made inside the block to `totals`."""
    yield
    for stage, seconds in generator.seconds.items():
        totals[stage] += seconds


def handler_section(name: str, checkpoint: Path, dtype: str, points_per_side: int) -> dict[str, Any]:
    """The handler keys of (b), the same in process and in the archive: every key of the smoke
    config is set, so the archive's handler section is exactly this. The thresholds are those
    of the shares (each run sets pred_iou_thresh, and keep-all NMS); no embedding cache."""
    return {
        "model_type": name,
        "sam_checkpoint": checkpoint.name,
        "dtype": dtype,
        "embedding_cache_bytes": 0,
        "points_per_side": points_per_side,
        "points_per_batch": AmgSettings.points_per_batch,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "box_nms_thresh": AmgSettings.box_nms_thresh,
    }


def ours_rows(tokens: list[str]) -> dict[str, tuple[str, torch.dtype]]:
    """(b), (b'), ...: each --dtypes value by its row label, which names the dtype it runs in here
    (and "auto" where that picked it); a value that gives a dtype already listed is left out."""
    rows: dict[str, tuple[str, torch.dtype]] = {}
    for token in tokens:
        dtype = resolve_precision(token, CPU).dtype
        if all(dtype != listed for _, listed in rows.values()):
            picked = " (auto)" if token == "auto" else ""
            primes = "'" * len(rows)
            rows[f"(b{primes}) ours {SHORT_NAMES[dtype]}{picked}"] = (token, dtype)
    return rows


def load_services(
    name: str, checkpoint: Path, ours: dict[str, tuple[str, torch.dtype]], points_per_side: int
) -> dict[str, MaskService]:
    """(b)'s service for each row of `ours`, loaded (and warmed up) as a worker loads it."""
    services = {}
    for label, (token, dtype) in ours.items():
        service = MaskService.load(handler_section(name, checkpoint, token, points_per_side), checkpoint.parent, None)
        assert service.dtype == dtype, (service.dtype, dtype)
        services[label] = service
    return services


def measure_model(
    name: str,
    checkpoint: Path,
    args: argparse.Namespace,
    images: list[np.ndarray],
    ours: dict[str, tuple[str, torch.dtype]],
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Rows by kept share for one model (the reference first), and its --server table lines."""
    model = model_type(name)
    net = model.family.code().build(model, str(checkpoint))
    ious = [predicted_ious(net, image, args.points_per_side) for image in images]
    services = load_services(name, checkpoint, ours, args.points_per_side)
    base = next(iter(services.values())).config.amg
    reference_generator(model, net, warm_up_settings(model.family)).generate(warm_up_image())
    variants: list[tuple[str, Callable[[AmgSettings], Any], Any]] = [
        (REFERENCE, lambda settings: reference_generator(model, net, settings), reference_clock)
    ]
    for label, service in services.items():
        variants.append((label, lambda settings, engine=service.engine: Served(engine, settings), engine_clock))
    by_share: dict[str, list[dict[str, Any]]] = {}
    server_lines = []
    for token in args.shares.split(","):
        label, _, options = sweep_setting(token, ious, {})
        settings = [apply_request_options(base, o, model.family.amg_keys, name) for o in options]
        by_share[label] = []
        for row_name, make, stages in variants:
            row = run_variant(row_name, make, stages, images, settings, TIMED_STAGES)
            print(f"{name}, {label}, {row_name}: {row['total']:.2f} s per image", file=sys.stderr, flush=True)
            by_share[label].append(row)
    if args.server:
        (token, _), service = next(iter(ours.values())), next(iter(services.values()))
        server_lines = server_table(name, checkpoint, token, service, images[0], ious[0], args)
    return by_share, server_lines


def server_table(
    name: str,
    checkpoint: Path,
    dtype: str,
    service: MaskService,
    image: np.ndarray,
    ious: np.ndarray,
    args: argparse.Namespace,
) -> list[str]:
    """One line per kept share: `image` through TorchServe serving the handler section of
    `service` (dtype key `dtype`) against the same request answered by `service`."""
    work = scratch_dir()
    section = handler_section(name, checkpoint, dtype, args.points_per_side)
    archive = smoke_archive(work, checkpoint, handler=section)
    written = yaml.safe_load(next(work.glob("*-config.yaml")).read_text())["handler"]
    assert written == section, f"the archive's handler section is not this run's: {written}"
    server = TorchServe(work, archive.parent, archive.name)
    png = base64.b64encode(encode(image)).decode()
    lines = []
    for token in args.shares.split(","):
        label, _, (settings,) = sweep_setting(token, [ious], {})
        overhead = request_overhead(server, service, {"image": png, **settings})
        lines.append(f"| {name} | {label} | {overhead.cells()} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def print_tables(results: dict[str, dict[str, list[dict[str, Any]]]], ours: list[str], images: int) -> None:
    """The seconds of every row and its ratio to (a), then each row by stage with its agreement."""
    names = [REFERENCE, *ours]
    print(f"\n### Seconds per image, whole generation (mean over {images} image(s))\n")
    print(
        "| model | kept | " + " | ".join(names) + " | " + " | ".join(f"{n.split(')')[0]}) vs (a)" for n in ours) + " |"
    )
    print("|---" * (2 + len(names) + len(ours)) + "|")
    for name, by_share in results.items():
        for share, rows in by_share.items():
            cells = [f"{row['total']:.2f}" for row in rows]
            ratios = [f"{rows[0]['total'] / row['total']:.1f}x" for row in rows[1:]]
            print(f"| {name} | {share} | " + " | ".join(cells + ratios) + " |")
    print("\n### By stage: seconds per image, masks, agreement with (a) (masks paired one to one)\n")
    print(
        "| model | kept | row | total | image encoder | mask decoder | embedding store | rest | masks "
        "| agreement with (a) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, by_share in results.items():
        for share, rows in by_share.items():
            for row in rows:
                store = "-" if row is rows[0] else f"{row['embedding_store']:.3f}"
                agrees = "-" if row is rows[0] else agreement(rows[0], row)
                print(
                    f"| {name} | {share} | {row['name']} | {row['total']:.2f} | {row['image_encoder']:.2f} "
                    f"| {row['mask_decoder']:.2f} | {store} | {row['post']:.2f} | {row['masks']:.0f} | {agrees} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sam2.1_hiera_tiny,sam2.1_hiera_base_plus,vit_b", help="model types")
    parser.add_argument("--images", default="astronaut,chelsea", help="skimage.data names, comma-separated")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--shares", default="0,0.3,1,all", help="kept shares of the pairs, 0 to 1 (all = keep-all)")
    parser.add_argument("--dtypes", default="auto", help="handler dtype values of ours, e.g. auto,float32")
    parser.add_argument("--server", action="store_true", help="also time whole requests through TorchServe")
    args = parser.parse_args()
    # The process keeps freed memory as a worker's does (MaskService.load): for the reference's rows too.
    keep_freed_memory()
    ours = ours_rows(args.dtypes.split(","))
    images = [getattr(sample_images, name)() for name in args.images.split(",")]
    print(f"# bench_sam2 on {cpu_description()}: {REFERENCE}, " + ", ".join(ours))
    print(f"# {command_line()}")
    sizes = ", ".join(
        f"{name} {image.shape[1]}x{image.shape[0]}" for name, image in zip(args.images.split(","), images)
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; models {args.models}; images {sizes}; "
        f"{args.points_per_side}x{args.points_per_side} points; random weights (seed 0)"
    )
    work = scratch_dir(prefix="bench-sam2-")
    results = {}
    server_lines: list[str] = []
    for name in args.models.split(","):
        checkpoint = save_random_checkpoint(work / f"random_{name}.pth", name)
        results[name], lines = measure_model(name, checkpoint, args, images, ours)
        server_lines += lines
        gc.collect()
    print_tables(results, list(ours), len(images))
    if server_lines:
        print(
            f"\n### Through TorchServe against in process: {next(iter(ours))}, the first image, a fresh start per row\n"
        )
        print(f"| model | kept | {OVERHEAD_COLUMNS} |")
        print("|---" * (2 + OVERHEAD_COLUMNS.count("|") + 1) + "|")
        print("\n".join(server_lines))


if __name__ == "__main__":
    main()
