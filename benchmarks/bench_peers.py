"""This engine against its CPU peers, side by side in one run: ONNX Runtime and OpenVINO.

    .venv-peers/bin/python -m benchmarks.bench_peers                         # 32x32 points, astronaut
    .venv-peers/bin/python -m benchmarks.bench_peers --points-per-side 8     # a quick check

The peers live in their own environment (the server never depends on them); make it with
    VENV=.venv-peers bash install_segment_anything_fast.sh
    .venv-peers/bin/pip install -r benchmarks/requirements-peers.txt
A peer that is not installed is skipped and said so; the reference and engine rows still run.

On the same random-weight vit_b checkpoint and the same image(s): (a) segment_anything in torch
fp32, (b) this engine in the dtype a worker serves in on this CPU (dtype auto: bf16 where the CPU
computes it natively, else fp32), (c) ONNX Runtime (CPU execution provider, fp32), (d) OpenVINO on
the CPU, asked for that same dtype (the precision it actually used is printed). The peers run vit_b as
exported once per run by torch.onnx.export: the image encoder, and segment_anything's
SamOnnxModel (prompt encoder, mask decoder and upscaling to the image) with a dynamic batch of
point prompts, so that one call decodes a whole `points_per_batch` batch against one embedding
(one decoder per image size; --cache keeps the exports for the next run).

Table 1 times the image encoder alone on a preprocessed 1024x1024 image (median of --repeats
after one warm-up) and compares each embedding with (a). Then whole automatic mask generation at
each kept share of --shares (benchmarks/shares.py: `pred_iou_thresh` at the quantile of the
image's predicted IoUs, from (a), that lets that share of its (point, mask) pairs through, the
same thresholds for every row): segment_anything's own generator runs the peer rows with its
encoder and decoder calls routed to the peer, so thresholds, stability, NMS and RLE are the
reference's code for (a), (c) and (d) alike. Mask agreement pairs masks one to one with (a).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from skimage import data as sample_images

from benchmarks.measure import (
    CPU,
    REFERENCE,
    SHORT_NAMES,
    agreement,
    command_line,
    cpu_description,
    cpu_model,
    engine_stages,
    median_seconds,
    reference_stages,
    run_variant,
    timed,
)
from benchmarks.shares import predicted_ious, sweep_setting
from sam_fast_serve.models.precision import resolve_precision
from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
from sam_fast_serve.server.runtime import keep_freed_memory
from sam_fast_serve.tools.cli import save_random_checkpoint

INSTALL = ".venv-peers/bin/pip install -r benchmarks/requirements-peers.txt"
# What each peer needs: its runtime, and what torch.onnx.export writes the graphs with.
PEERS = {
    "(c) ONNX Runtime": ("onnxruntime", "onnx", "onnxscript"),
    "(d) OpenVINO": ("openvino", "onnx", "onnxscript"),
}
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def decoder_feeds(embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of `SizedSamOnnxModel` for a batch of point prompts (coords (B, N, 2) already in
    the 1024 frame, labels (B, N)), without a mask input.

    The torch prompt encoder pads point prompts that come without a box with one not-a-point
    (label -1); SamOnnxModel expects the caller to add it. Its coordinates are masked out by the
    label, so (0, 0) matches the torch pad exactly."""
    batch = coords.shape[0]
    return {
        "image_embeddings": embedding,
        "point_coords": np.concatenate([coords, np.zeros((batch, 1, 2))], axis=1).astype(np.float32),
        "point_labels": np.concatenate([labels, -np.ones((batch, 1))], axis=1).astype(np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }


class SizedSamOnnxModel(torch.nn.Module):
    """segment_anything's SamOnnxModel (all four masks) for images of one size, a constant of the graph.

    Its crop to the unpadded size is traced as a constant anyway (int() of a tensor), and with the
    size as an input OpenVINO in bf16 rounded it (451 came out 452 pixels wide)."""

    def __init__(self, sam: Sam, original_size: tuple[int, ...]) -> None:
        super().__init__()
        self.decoder = SamOnnxModel(sam, return_single_mask=False)
        self.register_buffer("original_size", torch.tensor(original_size, dtype=torch.float32))

    def forward(self, *prompts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decoder(*prompts, self.original_size)


def export_encoder(sam: Sam, path: Path) -> None:
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.onnx.export(
            sam.image_encoder, (image,), path, input_names=["image"], output_names=["image_embeddings"], verbose=False
        )


def export_decoder(sam: Sam, original_size: tuple[int, ...], path: Path) -> None:
    """SizedSamOnnxModel with the batch and the point count dynamic.

    The torch.export-based exporter cannot take SamOnnxModel (its crop to the unpadded size calls
    int() on a tensor), so this is the TorchScript exporter that segment_anything's own export
    script uses."""
    rng = np.random.default_rng(0)
    feeds = decoder_feeds(
        rng.standard_normal((1, 256, 64, 64), np.float32), rng.uniform(0, 1024, (4, 1, 2)), np.ones((4, 1))
    )
    prompts = {0: "batch", 1: "points"}
    with warnings.catch_warnings():
        # The tracer's warnings are about the constant crop and the legacy exporter's deprecation.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            SizedSamOnnxModel(sam, original_size),
            tuple(torch.from_numpy(value) for value in feeds.values()),
            path,
            input_names=list(feeds),
            output_names=list(DECODER_OUTPUTS),
            dynamic_axes={"point_coords": prompts, "point_labels": prompts},
            opset_version=17,
            dynamo=False,
        )


def onnxruntime_runner(path: Path, threads: int, dtype: torch.dtype) -> tuple[Runner, str]:
    """ONNX Runtime's CPU execution provider, which runs the fp32 graph in fp32 whatever `dtype`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # With its arena, RSS grew by GiBs per encoder call here (past 17 GiB in one run); without, it stays ~1 GiB.
    options.enable_cpu_mem_arena = False
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (lambda feeds: session.run(None, feeds)), f"fp32, CPU EP, {threads} intra-op threads"


def openvino_runner(path: Path, threads: int, dtype: torch.dtype) -> tuple[Runner, str]:
    """OpenVINO on the CPU, asked to infer in `dtype` (it falls back where the CPU lacks it)."""
    import openvino

    asked = OPENVINO_PRECISIONS[dtype]

    compiled = openvino.Core().compile_model(
        str(path),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": asked,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
        },
    )
    used = (
        f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()} (asked {asked}), "
        f"{compiled.get_property('NUM_STREAMS')} stream, {compiled.get_property('INFERENCE_NUM_THREADS')} threads"
    )

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = compiled(feeds)
        return [result[output] for output in compiled.outputs]

    return run, used


# OpenVINO's names of the dtypes (its INFERENCE_PRECISION_HINT values).
OPENVINO_PRECISIONS = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}
LOADERS: dict[str, Callable[[Path, int, torch.dtype], tuple[Runner, str]]] = {
    "(c) ONNX Runtime": onnxruntime_runner,
    "(d) OpenVINO": openvino_runner,
}


def encode_with(encoder: Runner, image: torch.Tensor) -> torch.Tensor:
    """The image embedding of a peer's encoder for a preprocessed (1, 3, 1024, 1024) image."""
    return torch.from_numpy(encoder({"image": image.numpy()})[0])


class PeerPredictor(SamPredictor):
    """segment_anything's predictor with its image encoder and mask decoder calls run by a peer;
    `decoders` holds one decoder runner per original image size (see `SizedSamOnnxModel`)."""

    def __init__(self, sam: Sam, encoder: Runner, decoders: dict[tuple[int, ...], Runner]) -> None:
        super().__init__(sam)
        self.encoder = encoder
        self.decoders = decoders

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return encode_with(self.encoder, image)

    def decode(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.decoders[self.original_size](feeds)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = self.encode(self.model.preprocess(transformed_image))
        self.is_image_set = True

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if point_coords is None or point_labels is None or boxes is not None or mask_input is not None:
            raise NotImplementedError("the peer decoder takes point prompts only (all the generator sends)")
        feeds = decoder_feeds(self.features.numpy(), point_coords.numpy(), point_labels.numpy())
        masks, iou_predictions, low_res_masks = map(torch.from_numpy, self.decode(feeds))
        # Output 0 is the single-mask output; the multimask outputs are 1..3, as in MaskDecoder.forward.
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        masks = masks[:, chosen]
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions[:, chosen], low_res_masks[:, chosen]


def peer_generator(
    sam: Sam, encoder: Runner, decoders: dict[tuple[int, ...], Runner], kwargs: dict[str, Any]
) -> ReferenceGenerator:
    """segment_anything's generator with its image encoder and mask decoder calls run by a peer."""
    generator = ReferenceGenerator(sam, **kwargs)
    generator.predictor = PeerPredictor(sam, encoder, decoders)
    return generator


def peer_stages(generator: ReferenceGenerator, totals: dict[str, float]) -> contextlib.ExitStack:
    """The reference's stages (its RLE runs unchanged), with the encoder and decoder timed at the
    peer; the peer's decoder includes SamOnnxModel's upscaling."""
    stack = reference_stages(generator, totals)
    stack.enter_context(timed(totals, "encoder", generator.predictor, "encode"))
    stack.enter_context(timed(totals, "decoder", generator.predictor, "decode"))
    return stack


def available_peers() -> list[str]:
    """The peers whose modules are importable; the others are reported as skipped."""
    found = []
    for name, modules in PEERS.items():
        missing = [module for module in modules if importlib.util.find_spec(module) is None]
        if missing:
            print(f"{name}: skipped, not installed ({', '.join(missing)} missing): {INSTALL}")
        else:
            print(f"{name}: installed ({modules[0]} {importlib.import_module(modules[0]).__version__})")
            found.append(name)
    return found


def export_models(
    sam: Sam, checkpoint: Path, sizes: set[tuple[int, ...]], directory: Path
) -> tuple[Path, dict[tuple[int, ...], Path]]:
    """Export the encoder and one decoder per image size into `directory`, reusing files there
    that came from the same checkpoint."""
    key = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    encoder = directory / f"encoder-{key}.onnx"
    if not encoder.exists():
        export_encoder(sam, encoder)
    decoders = {size: directory / f"decoder-{key}-{size[0]}x{size[1]}.onnx" for size in sorted(sizes)}
    for size, path in decoders.items():
        if not path.exists():
            export_decoder(sam, size, path)
    return encoder, decoders


def preprocessed(sam: Sam, image: np.ndarray) -> torch.Tensor:
    """The (1, 3, 1024, 1024) encoder input SamPredictor.set_image makes of `image`."""
    predictor = SamPredictor(sam)
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1).contiguous()[None]
    return sam.preprocess(resized)


def encoder_table(
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]], image: torch.Tensor, repeats: int
) -> None:
    """Seconds per call of each encoder on `image`, and its embedding against the first's."""
    rows = []
    with torch.inference_mode():
        for name, encode in encoders.items():
            embedding = encode(image).float()  # the warm-up
            rows.append((name, median_seconds(partial(encode, image), repeats), embedding))
    reference, engine_seconds = rows[0][2], rows[1][1]
    print(f"\n### Image encoder alone: seconds per 1024x1024 image (median of {repeats}, after a warm-up)\n")
    print("| variant | seconds | (b) faster by | embedding max abs error / max abs (a) |")
    print("|---|---|---|---|")
    for name, seconds, embedding in rows:
        error = float((embedding - reference).abs().max() / reference.abs().max())
        print(f"| {name} | {seconds:.2f} | {seconds / engine_seconds:.1f}x | {error:.2e} |")


def print_share(title: str, rows: list[dict[str, Any]]) -> None:
    reference, engine = rows[0], rows[1]
    print(f"\n### {title}: seconds per image (vit_b, {len(reference['outputs'])} images)\n")
    print(
        "| variant | total | encoder | decoder + upsample | rest | masks | peak RSS | (b) faster by "
        "| agreement with (a) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        decoder = row["decoder"] + row["upsample"]
        print(
            f"| {row['name']} | {row['total']:.2f} | {row['encoder']:.2f} | {decoder:.2f} "
            f"| {row['total'] - row['encoder'] - decoder:.2f} | {row['masks']:.0f} | {row['rss'] / 2**30:.2f} GiB "
            f"| {row['total'] / engine['total']:.1f}x | {'-' if row is reference else agreement(reference, row)} |"
        )
    peers = rows[2:]
    if peers:
        fastest = min(peers, key=lambda row: row["total"])
        print(f"\n(b) against the faster peer, {fastest['name']}: {fastest['total'] / engine['total']:.1f}x as fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: a random-weight vit_b (seed 0)")
    parser.add_argument("--images", default="astronaut", help="skimage.data names, comma-separated")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--shares", default="0,0.3,1", help="kept shares of the pairs, 0 to 1 (all = keep-all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the encoder alone")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for torch and each peer")
    parser.add_argument("--cache", type=Path, help="keep the exported models here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a worker does (MaskService.load): the engine row runs as it serves
    print(f"# bench_peers: {command_line()}")
    dtype = resolve_precision("auto", CPU).dtype
    print(
        f"{cpu_description()}: (b) in {SHORT_NAMES[dtype]} (dtype auto); torch {torch.__version__}, "
        f"{args.threads} threads for torch and each peer"
    )
    peers = available_peers()

    images = [getattr(sample_images, name)() for name in args.images.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as work:
        checkpoint = args.checkpoint or save_random_checkpoint(Path(work) / "random_vit_b.pth")
        reference_sam = cpu_model(checkpoint)
        engine_sam = cpu_model(checkpoint, dtype)
        cache = args.cache or Path(work)
        cache.mkdir(parents=True, exist_ok=True)
        runners: dict[str, tuple[Runner, dict[tuple[int, ...], Runner]]] = {}
        if peers:
            encoder_path, decoder_paths = export_models(
                reference_sam, checkpoint, {image.shape[:2] for image in images}, cache
            )
            for name in peers:
                encoder, used = LOADERS[name](encoder_path, args.threads, dtype)
                decoders = {size: LOADERS[name](path, args.threads, dtype)[0] for size, path in decoder_paths.items()}
                runners[f"{name} {used}"] = (encoder, decoders)
        run_benchmark(args, images, reference_sam, engine_sam, dtype, runners)


def run_benchmark(
    args: argparse.Namespace,
    images: list[np.ndarray],
    reference_sam: Sam,
    engine_sam: Sam,
    dtype: torch.dtype,
    runners: dict[str, tuple[Runner, dict[tuple[int, ...], Runner]]],
) -> None:
    engine = f"(b) engine {SHORT_NAMES[dtype]}"
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        REFERENCE: reference_sam.image_encoder,
        engine: lambda image: engine_sam.image_encoder(image.to(dtype)),
    }
    for name, (encoder, _) in runners.items():
        encoders[name] = partial(encode_with, encoder)
    encoder_table(encoders, preprocessed(reference_sam, images[0]), args.repeats)

    variants: list[tuple[str, Callable[[dict[str, Any]], Any], Any]] = [
        (REFERENCE, lambda kw: ReferenceGenerator(reference_sam, **kw), reference_stages),
        (engine, lambda kw: SamAutomaticMaskGenerator(engine_sam, decoder_dtype=dtype, **kw), engine_stages),
    ]
    for name, (encoder, decoders) in runners.items():
        variants.append((name, partial(peer_generator, reference_sam, encoder, decoders), peer_stages))

    ious = [predicted_ious(reference_sam, image, args.points_per_side) for image in images]
    base = {"points_per_side": args.points_per_side, "output_mode": "coco_rle"}
    for token in args.shares.split(","):
        _, title, settings = sweep_setting(token, ious, base)
        rows = [run_variant(name, make, stages, images, settings) for name, make, stages in variants]
        print_share(title, rows)


if __name__ == "__main__":
    main()
