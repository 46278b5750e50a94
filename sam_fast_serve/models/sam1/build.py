"""Building SAM 1 models from segment_anything, and preparing them to serve: device, precision, the
fast encoder blocks, int8, optional compile."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from segment_anything.build_sam import _build_sam, sam_model_registry
from segment_anything.modeling import Sam

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.checkpoints import load_fitting
from sam_fast_serve.models.precision import Precision
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.sam1.fast_encoder import accelerate_image_encoder
from sam_fast_serve.models.sam1.quantize import quantize_image_encoder


def _test_vit(checkpoint: None = None) -> Sam:
    """A random-weight ViT of SAM 1's shape at a small fraction of vit_b's FLOPs (2 blocks of 64
    channels, one windowed and one global): the same code paths, for plumbing tests."""
    return _build_sam(
        encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1], checkpoint=None
    )


_BUILDERS: dict[str, Callable[..., Sam]] = {**sam_model_registry, "test_vit": _test_vit}


def build(model: ModelType, checkpoint: str | None = None) -> Sam:
    """Build `model` on the CPU in eval mode; load `checkpoint` (a state dict file) with
    weights_only=True if given, else keep random weights. Raises ConfigError when the checkpoint
    is not one of `model`."""
    # segment_anything's own loader calls torch.load without weights_only, so it gets no path.
    sam = _BUILDERS[model.build](checkpoint=None)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "model" in state:
            raise ConfigError(f"{checkpoint}: not a SAM 1 checkpoint (a state dict; {{'model': ...}} is SAM 2's form)")
        load_fitting(sam, state, checkpoint, model.name)
    return sam.eval()


def save_checkpoint(sam: Sam, path: Path) -> None:
    """Write `sam` as an official SAM 1 checkpoint file: its state dict."""
    torch.save(sam.state_dict(), path)


def prepare_model(
    sam: Sam, device: torch.device, precision: torch.dtype | Precision, compile_encoder: bool = False
) -> Sam:
    """Move `sam` to `device`, cast its image encoder to the float dtype of `precision` (a plain
    dtype: that dtype without int8), give it the fast blocks, and with int8 (CPU only, see
    `resolve_precision`) quantize its linear layers.

    The prompt encoder stays fp32 (its Fourier features of pixel coordinates lose whole pixels in
    bf16); the mask decoder stays fp32 as the source of the fast decoder's weights, which are cast
    there (to `precision`'s dtype). With `compile_encoder`, the encoder is wrapped in torch.compile
    (the cache directory is TORCHINDUCTOR_CACHE_DIR, set before the first compile so restarts reuse
    it); not with int8, whose oneDNN kernels torch.compile would replace by float ones (ConfigError).
    """
    if isinstance(precision, torch.dtype):
        precision = Precision(precision)
    if precision.int8 and compile_encoder:
        raise ConfigError("handler keys 'dtype' int8 and 'compile' true exclude each other: compiling drops the int8")
    sam = sam.to(device).eval()
    encoder = accelerate_image_encoder(sam.image_encoder.to(precision.dtype))
    if precision.int8:
        quantize_image_encoder(encoder)
    if compile_encoder:
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        sam.image_encoder = torch.compile(sam.image_encoder, dynamic=False)
    return sam
