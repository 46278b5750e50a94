"""Building SAM models: `sam_model_fast_registry`, device and precision choice, optional compile."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from .config import INT8
from .errors import ConfigError
from .fast_encoder import accelerate_image_encoder
from .quantize import quantize_image_encoder


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


def _cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; none where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is faster than fp32."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot products that oneDNN's int8 linear uses (AVX512-VNNI or AMX)."""
    return bool(_cpu_flags() & {"avx512_vnni", "amx_int8"})


@dataclass(frozen=True)
class Precision:
    """How a prepared model computes.

    dtype: the float dtype of the image encoder (its embeddings, attention, norms, neck) and of the
    fast mask decoder. int8: whether the encoder's linear layers compute in int8 instead (quantize.py).
    """

    dtype: torch.dtype
    int8: bool = False

    @property
    def name(self) -> str:
        """Its name as the config's `dtype` key gives it: "int8", or the dtype's torch name."""
        return INT8 if self.int8 else str(self.dtype).removeprefix("torch.")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `name` ("auto" or one of config.DTYPE_NAMES) on `device`.

    auto: bf16 on CUDA devices that support it and on CPUs with native bf16, else fp32. "int8" is
    no compute dtype: `resolve_precision` resolves it.
    """
    if name == INT8:
        raise ValueError("dtype int8 is a precision, not a compute dtype: use resolve_precision")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype), name
    return dtype


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision for the config's `dtype` key: "auto", one of config.DTYPE_NAMES, or "int8".

    int8: the dtype "auto" picks, with the image encoder's linear layers in int8. It runs on x86
    CPUs with AVX512-VNNI or AMX only; elsewhere it is refused with a ConfigError naming the key,
    rather than served in float under the int8 name.
    """
    if name != INT8:
        return Precision(resolve_dtype(name, device))
    if device.type != "cpu":
        raise ConfigError(f"handler key 'dtype' int8 runs on CPUs only, and this worker runs on {device}")
    if not cpu_has_int8_dot():
        raise ConfigError("handler key 'dtype' int8 needs a CPU with AVX512-VNNI or AMX, which this one lacks")
    return Precision(resolve_dtype("auto", device), int8=True)


def select_device(gpu_id: int | None) -> torch.device:
    """`cuda:<gpu_id>` when CUDA is available and TorchServe assigned a GPU, else the CPU."""
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


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
