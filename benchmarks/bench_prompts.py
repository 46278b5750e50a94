"""Prompted masks: the first prompt on an image (decode + image encoder + decoder) against the
next prompts on the same image (embedding cache hit: decoder only), through the mask service.

    python -m benchmarks.bench_prompts [--models vit_b,sam2.1_hiera_tiny] [--dtype auto] [--prompts 10]
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import time
from collections.abc import Callable

from PIL import Image
from skimage import data

from benchmarks.measure import cpu_description, median_seconds, scratch_dir
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_b,sam2.1_hiera_tiny", help="model types, comma-separated")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=10)
    args = parser.parse_args()
    model_dir = scratch_dir()
    print(f"# bench_prompts on {cpu_description()}: dtype {args.dtype}, one click or one box per request\n")
    print("| model | image | request | seconds | encoder calls | speedup vs first |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        checkpoint = save_random_checkpoint(model_dir / f"random_{model}.pth", model)
        section = {"model_type": model, "sam_checkpoint": checkpoint.name, "dtype": args.dtype}
        table(model, MaskService.load(section, model_dir, None), args.prompts)


def table(model: str, service: MaskService, prompts: int) -> None:
    """The rows of one model: per photo, the first prompt and the medians of the next ones."""
    for name in ("astronaut", "chelsea"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buffer, "PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        started = time.perf_counter()
        first = service.handle([({"body": {"image": image, "points": [[100, 100]]}}, {})])[0]
        first_s = time.perf_counter() - started
        image_id = first.headers["X-Image-Id"]
        calls = service.engine.predictor.encoder_calls
        print(f"| {model} | {name} | first prompt (image sent) | {first_s:.3f} | {calls} | 1.0x |")
        for label, request in (
            ("next click (image_id)", lambda i: {"image_id": image_id, "points": [[20 + 15 * i, 40 + 10 * i]]}),
            ("next box (image_id)", lambda i: {"image_id": image_id, "boxes": [[10 + i, 20, 200 + 5 * i, 260]]}),
            ("next click (image sent again)", lambda i: {"image": image, "points": [[20 + 15 * i, 40 + 10 * i]]}),
        ):
            numbers = itertools.count()

            def one(request: Callable[[int], dict] = request) -> None:
                reply = service.handle([({"body": request(next(numbers))}, {})])[0]
                assert reply.status == 200, reply.body

            median = median_seconds(one, prompts)
            calls = service.engine.predictor.encoder_calls
            print(
                f"| {model} | {name} | {label}, median of {prompts} | {median:.3f} | {calls} | {first_s / median:.0f}x |"
            )


if __name__ == "__main__":
    main()
