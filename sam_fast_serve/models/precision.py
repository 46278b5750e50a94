"""The device and the precision a model computes in: `auto` per device, bf16 only where the CPU or
the GPU computes it natively, int8 only where its kernels run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from sam_fast_serve.common.errors import ConfigError

logger = logging.getLogger(__name__)

# Compute dtypes by their torch names; "auto" picks one per device (resolve_dtype). No float16: the
# fast decoder computes in float32 or bfloat16 only.
DTYPE_NAMES = ("float32", "bfloat16")
# Not a compute dtype: "auto"'s dtype with the image encoder's linear layers in int8 (x86 CPUs with
# AVX512-VNNI or AMX; resolve_precision, sam1/quantize.py).
INT8 = "int8"
# How much slower vit_b's encoder was in bf16 than in fp32 on a CPU without native bf16 (AVX2-only
# AMD EPYC, 2 cores: 169 s against 17.9 s), where torch emulates bf16 arithmetic.
EMULATED_BF16_FACTOR = 9.4
# The first CUDA compute capability with bf16 tensor cores (Ampere: A100 8.0, A10 8.6, L4 8.9, H100
# 9.0). Below it (V100 7.0, T4 7.5) torch emulates bf16 with float32 arithmetic: no faster than
# float32, and less exact.
NATIVE_BF16_CAPABILITY = (8, 0)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; none where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is faster than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def gpu_has_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of compute `capability` (major, minor) computes bf16 natively."""
    return capability >= NATIVE_BF16_CAPABILITY


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CPU by its flags, a CUDA GPU by its own compute
    capability (not the current device's, and not counting emulation as
    torch.cuda.is_bf16_supported() does by default)."""
    if device.type == "cuda":
        return gpu_has_native_bf16(torch.cuda.get_device_capability(device))
    return cpu_has_native_bf16()


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot products that oneDNN's int8 linear uses (AVX512-VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "amx_int8"})


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
    """The compute dtype for `name` ("auto" or one of DTYPE_NAMES) on `device`.

    auto: bf16 where `device` computes it natively (has_native_bf16), else fp32. "int8" is no
    compute dtype: `resolve_precision` resolves it.
    """
    if name == INT8:
        raise ValueError("dtype int8 is a precision, not a compute dtype: use resolve_precision")
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype), name
    return dtype


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision for the config's `dtype` key: "auto", one of DTYPE_NAMES, or "int8".

    int8: the dtype "auto" picks, with the image encoder's linear layers in int8. It runs on x86
    CPUs with AVX512-VNNI or AMX only; elsewhere it is refused with a ConfigError naming the key,
    rather than served in float under the int8 name. bfloat16 on a device without native bf16 is
    served, with a warning at load that says what it costs against float32.
    """
    if name == "bfloat16" and not has_native_bf16(device):
        _warn_emulated_bf16(device)
    if name != INT8:
        return Precision(resolve_dtype(name, device))
    if device.type != "cpu":
        raise ConfigError(f"handler key 'dtype' int8 runs on CPUs only, and this worker runs on {device}")
    if not cpu_has_int8_dot():
        raise ConfigError("handler key 'dtype' int8 needs a CPU with AVX512-VNNI or AMX, which this one lacks")
    return Precision(resolve_dtype("auto", device), int8=True)


def _warn_emulated_bf16(device: torch.device) -> None:
    """Log that `device` emulates bf16, and what that costs against float32."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        lacking = f"compute capability {major}.{minor}, below {'.'.join(map(str, NATIVE_BF16_CAPABILITY))}"
        cost = "no faster than float32"
    else:
        lacking = "no avx512_bf16 or amx_bf16 flag"
        cost = f"about {EMULATED_BF16_FACTOR:.1f}x slower than float32 (vit_b's encoder on an AVX2-only CPU)"
    logger.warning(
        "dtype bfloat16 on %s without native bf16 (%s): torch emulates it, %s; dtype auto picks float32 here",
        device,
        lacking,
        cost,
    )


def select_device(gpu_id: int | None) -> torch.device:
    """`cuda:<gpu_id>` when CUDA is available and TorchServe assigned a GPU, else the CPU. A GPU
    that torch does not see is a ConfigError saying so (TorchServe counts GPUs by itself)."""
    if not torch.cuda.is_available() or gpu_id is None:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if not 0 <= gpu_id < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ConfigError(
            f"TorchServe gave this worker GPU {gpu_id}, and torch sees {count} (CUDA_VISIBLE_DEVICES {visible}): "
            "set TorchServe's number_of_gpu, or the model config's deviceIds, to GPUs torch sees"
        )
    return torch.device("cuda", gpu_id)


def use_device(device: torch.device) -> None:
    """Make a CUDA `device` the process's current device (nothing on the CPU); a worker does it
    once, at load. What names no device (torch.cuda.empty_cache, a new stream, a library's
    `.cuda()`) then runs on the worker's GPU, rather than opening a context on GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
