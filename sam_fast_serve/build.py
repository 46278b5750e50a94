"""Building SAM models: `sam_model_fast_registry`, device and dtype choice, optional compile."""

import os
from typing import Callable, Dict, Optional

import torch
from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
from segment_anything.modeling import Sam

from .fast_encoder import accelerate_image_encoder


def _from_segment_anything(builder: Callable[..., Sam]) -> Callable[[Optional[str]], Sam]:
    def build(checkpoint: Optional[str] = None) -> Sam:
        """Build the model; load `checkpoint` (a state dict file) with weights_only=True if given."""
        # segment_anything's own loader calls torch.load without weights_only, so it gets no path.
        sam = builder(checkpoint=None)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            sam.load_state_dict(state)
        return sam.eval()

    return build


sam_model_fast_registry: Dict[str, Callable[[Optional[str]], Sam]] = {
    "default": _from_segment_anything(build_sam_vit_h),
    "vit_h": _from_segment_anything(build_sam_vit_h),
    "vit_l": _from_segment_anything(build_sam_vit_l),
    "vit_b": _from_segment_anything(build_sam_vit_b),
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
    """The compute dtype for `name` in auto|float32|bfloat16|float16 on `device`.

    auto: bf16 on CUDA devices that support it and on CPUs with native bf16, else fp32.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def select_device(gpu_id: Optional[int]) -> torch.device:
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
