"""Benchmark SAM's mask decoder against `FastMaskDecoder`, float32 and bfloat16, on CPU.

    python -m benchmarks.bench_decoder [--batch 64] [--repeats 3]

Decodes `--batch` single positive point prompts (automatic mask generation's case) on
one random image embedding with a random-weight vit_b SAM (the decoder is the same
for every SAM variant and its speed does not depend on the weights). For each variant
it reports the best of `--repeats` timings, in seconds per batch, of

* transformer+iou: the two-way transformer and IoU head (reference: `predict_masks`
  up to the end of its transformer call; fast: `run_transformer`),
* masks: output upscaling + hypernetworks for all prompts and all 4 mask tokens
  (reference: the rest of `predict_masks`; fast: `mask_logits`),

plus the fast decoder's once-per-image `prepare_image`, speedups against the float32
reference, and the largest differences from the float32 reference outputs.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from segment_anything import build_sam_vit_b
from segment_anything.modeling import MaskDecoder
from torch import Tensor

from sam_fast_serve.models.fast_decoder import FastMaskDecoder
from sam_fast_serve.server.runtime import keep_freed_memory


@dataclass(frozen=True)
class Inputs:
    image_embeddings: Tensor  # (1, 256, 64, 64)
    image_pe: Tensor  # (1, 256, 64, 64)
    sparse: Tensor  # (B, 2, 256)
    dense: Tensor  # (1, 256, 64, 64)


@dataclass(frozen=True)
class Result:
    name: str
    prepare_s: float | None  # per image; None for the reference
    transformer_s: float
    masks_s: float
    iou: Tensor  # (B, 4) float32
    masks: Tensor  # (B, 4, 256, 256) float32


def make_inputs(batch: int, seed: int) -> tuple[MaskDecoder, Inputs]:
    """A random-weight vit_b decoder and `batch` single positive point prompts."""
    torch.manual_seed(seed)
    sam = build_sam_vit_b(checkpoint=None).eval()
    points = torch.rand(batch, 1, 2) * 1024
    labels = torch.ones(batch, 1, dtype=torch.long)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        inputs = Inputs(torch.randn(1, 256, 64, 64), sam.prompt_encoder.get_dense_pe(), sparse, dense[:1])
    return sam.mask_decoder, inputs


def best_of(repeats: int, run: Callable[[], tuple[float, ...]]) -> tuple[float, ...]:
    """Element-wise minimum of the timings `run` returns over `repeats` calls."""
    timings = [run() for _ in range(repeats)]
    return tuple(min(column) for column in zip(*timings, strict=True))


def bench_reference(name: str, decoder: MaskDecoder, inputs: Inputs, dtype: torch.dtype, repeats: int) -> Result:
    """Times `decoder.predict_masks`, split where its transformer call returns."""
    decoder = decoder if dtype == torch.float32 else copy.deepcopy(decoder).to(dtype)
    args = [x.to(dtype) for x in (inputs.image_embeddings, inputs.image_pe, inputs.sparse)]
    dense = inputs.dense.expand(inputs.sparse.shape[0], -1, -1, -1).to(dtype)
    marks: dict[str, float] = {}
    hook = decoder.transformer.register_forward_hook(lambda *_: marks.__setitem__("transformer", time.perf_counter()))
    outputs: list[tuple[Tensor, Tensor]] = []

    def run() -> tuple[float, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            outputs[:] = [decoder.predict_masks(args[0], args[1], args[2], dense)]
            end = time.perf_counter()
        # The IoU head runs after the upscaling in predict_masks but costs microseconds.
        return marks["transformer"] - start, end - marks["transformer"]

    try:
        transformer_s, masks_s = best_of(repeats, run)
    finally:
        hook.remove()
    masks, iou = outputs[0]
    return Result(name, None, transformer_s, masks_s, iou.float(), masks.float())


def bench_fast(name: str, decoder: MaskDecoder, inputs: Inputs, dtype: torch.dtype, repeats: int) -> Result:
    """Times `prepare_image`, `run_transformer` and `mask_logits` for all prompts and mask tokens."""
    fast = FastMaskDecoder(decoder, dtype)
    batch = inputs.sparse.shape[0]
    prompt_idx = torch.arange(batch).repeat_interleave(fast.num_mask_tokens)
    mask_idx = torch.arange(fast.num_mask_tokens).repeat(batch)
    outputs: list[tuple[Tensor, Tensor]] = []

    def run() -> tuple[float, float, float]:
        start = time.perf_counter()
        state = fast.prepare_image(inputs.image_embeddings, inputs.image_pe, inputs.dense)
        prepared = time.perf_counter()
        tokens = fast.run_transformer(state, inputs.sparse)
        decoded = time.perf_counter()
        masks = fast.mask_logits(tokens, prompt_idx, mask_idx)
        end = time.perf_counter()
        outputs[:] = [(tokens.iou_pred, masks.view(batch, fast.num_mask_tokens, *masks.shape[-2:]))]
        return prepared - start, decoded - prepared, end - decoded

    run()  # warm-up: first-call allocations and kernel selection
    prepare_s, transformer_s, masks_s = best_of(repeats, run)
    iou, masks = outputs[0]
    return Result(name, prepare_s, transformer_s, masks_s, iou, masks)


def print_table(results: list[Result], batch: int) -> None:
    base = results[0]
    header = (
        f"{'variant':<14}{'prepare':>9}{'transf+iou':>12}{'masks':>9}{'total':>9}"
        f"{'x t+iou':>9}{'x total':>9}{'max|d iou|':>12}{'max|d logit|':>14}{'sign agree':>12}"
    )
    print(f"seconds per {batch} prompts (best of repeats); differences vs reference fp32")
    print(header)
    print("-" * len(header))
    for r in results:
        total = r.transformer_s + r.masks_s + (r.prepare_s or 0.0)
        base_total = base.transformer_s + base.masks_s
        agree = ((r.masks > 0) == (base.masks > 0)).float().mean().item()
        prepare = f"{r.prepare_s:9.3f}" if r.prepare_s is not None else f"{'-':>9}"
        print(
            f"{r.name:<14}{prepare}{r.transformer_s:12.3f}{r.masks_s:9.3f}{total:9.3f}"
            f"{base.transformer_s / r.transformer_s:9.1f}{base_total / total:9.1f}"
            f"{(r.iou - base.iou).abs().max().item():12.2e}"
            f"{(r.masks - base.masks).abs().max().item():14.2e}{100 * agree:11.3f}%"
        )
    print(f"(logit scale: max|logit| = {base.masks.abs().max().item():.3g}; 'total' includes prepare)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="prompts per batch (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keep_freed_memory()  # as a worker does (MaskService.load): the decoder's chunks assume it

    decoder, inputs = make_inputs(args.batch, args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    results = [
        bench_reference("reference fp32", decoder, inputs, torch.float32, args.repeats),
        bench_reference("reference bf16", decoder, inputs, torch.bfloat16, args.repeats),
        bench_fast("fast fp32", decoder, inputs, torch.float32, args.repeats),
        bench_fast("fast bf16", decoder, inputs, torch.bfloat16, args.repeats),
    ]
    print_table(results, args.batch)


if __name__ == "__main__":
    main()
