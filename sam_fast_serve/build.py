"""Building SAM models: `sam_model_fast_registry`, device and dtype choice, optional compile."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from .fast_encoder import accelerate_image_encoder


def _from_segment_anything(builder: Callable[..., Sam]) -> Callable[[str | None], Sam]:
    def build(checkpoint: str | None = None) -> Sam:
        """Build the model; load `checkpoint` (a state dict file) with weights_only=True if given."""
        # segment_anything's own loader calls torch.load without weights_only, so it gets no path.
        sam = builder(checkpoint=None)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            sam.load_state_dict(state)
        return sam.eval()

    return build


# segment_anything's model types ("default" = vit_h), each loading its checkpoint safely.
sam_model_fast_registry: dict[str, Callable[[str | None], Sam]] = {
    name: _from_segment_anything(builder) for name, builder in sam_model_registry.items()
}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `name` ("auto" or one of config.DTYPE_NAMES) on `device`.

    auto: bf16 on CUDA devices that support it and on CPUs with native bf16, else fp32.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype), name
    return dtype


def select_device(gpu_id: int | None) -> torch.device:
    """`cuda:<gpu_id>` when CUDA is available and TorchServe assigned a GPU, else the CPU."""
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def prepare_model(sam: Sam, device: torch.device, dtype: torch.dtype, compile_encoder: bool = False) -> Sam:
    """Move `sam` to `device`, cast its image encoder to `dtype` and give it the fast blocks.

    The prompt encoder stays fp32 (its Fourier features of pixel coordinates lose whole pixels in
    bf16); the mask decoder stays fp32 as the source of the fast decoder's weights, which are cast
    there. With `compile_encoder`, the encoder is wrapped in torch.compile (the cache directory is
    TORCHINDUCTOR_CACHE_DIR, set before the first compile so restarts reuse it).
    """
    sam = sam.to(device).eval()
    accelerate_image_encoder(sam.image_encoder.to(dtype))
    if compile_encoder:
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        sam.image_encoder = torch.compile(sam.image_encoder, dynamic=False)
    return sam
