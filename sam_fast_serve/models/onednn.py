"""oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor uses for CPU linears)
where it can run, for the products whose other kernels are slower.

aten's float32 products are MKL's. On AMD CPUs they reach ~200 GFLOP/s where oneDNN reaches ~450
(2 Zen 5 cores, SAM 1's encoder, sam1/fast_encoder.py: its global attention's products one head at
a time ran 2.5-3x faster than aten's float32 bmm, ~10% faster in bf16). On a 2-core Intel Xeon of
the Ice Lake class (AVX-512 without bf16) MKL computes a product with a 64-column output, the
memory attention's weighted sum of its 64-channel values (512 x 28,736 by 28,736 x 64), at 95
GFLOP/s where oneDNN's linear reaches 194; there, too, the mask head's two linears with SAM 2's
high-resolution features added in the same call took 10.6-10.9 ms a prompt against 11.9-12.0 for
aten's linears and adds (fp32, median of 40, two runs). With AVX2 only it is the other way round:
on 2 Zen 3 cores MKL's fp32 linear beat oneDNN's even where oneDNN fused what aten does in a second
pass (median of 30: the mask head's 4096 x 256 x 256 with its add 4.67 against 5.23 ms, the MLP's
4096 x 768 x 3072 with its GELU 154 against 203 ms; vit_b's encoder 8.3-8.5 s against 8.6-9.3),
so there float32 stays with aten.

- `applies(x, weight)`: whether oneDNN's linear can compute x @ weight^T here.
- `pays(x, weight)`: whether it applies and is the faster kernel here (the two below use it).
- `matmul_transposed(a, b)`: a @ b^T, by oneDNN's linear where b is one matrix.
- `linear(x, weight, bias, gelu=, residual=)`: a linear layer with its GELU or a residual add fused
  into oneDNN's linear where it pays.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["applies", "linear", "matmul_transposed", "pays"]

# oneDNN's linear runs on x86 CPUs for fp32, and for bf16 where oneDNN supports it (AVX-512 or
# AMX); elsewhere (ARM, CUDA, fp16) callers use aten's products.
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Its float32 kernels beat MKL's where aten's CPU kernels are AVX-512 ones (above).
FLOAT32_PAYS = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN's linear can compute x @ weight^T here.

    Not with autograd (it has no backward), autocast (it has no autocast rule), nor inside
    torch.compile (inductor lowers it only for frozen weights; it picks its own linears).
    """
    if not _X86 or x.device.type != "cpu" or x.dtype != weight.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling():
        return False
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pays(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN's linear can compute x @ weight^T here (`applies`) and is the faster kernel:
    in bf16 wherever it applies, in float32 where FLOAT32_PAYS."""
    return applies(x, weight) and (x.dtype != torch.float32 or FLOAT32_PAYS)


def matmul_transposed(a: Tensor, b: Tensor) -> Tensor:
    """a @ b^T for (..., M, K) `a` and (..., P, K) `b`: (..., M, P), broadcast as torch.matmul.

    Where `b` is one matrix (its leading dimensions all 1, `a` with at least as many) and oneDNN's
    linear pays, it is that linear's weight; elsewhere torch.matmul on b's transposed view.
    """
    single = math.prod(b.shape[:-2]) == 1 and a.dim() >= b.dim()
    if single and pays(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.reshape(b.shape[-2:]), None, "none", [], "")
    return torch.matmul(a, b.transpose(-1, -2))


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False, residual: Tensor | None = None
) -> Tensor:
    """[residual +] [gelu](x @ weight^T + bias) for (..., in) `x`, (out, in) `weight` and (..., out)
    `residual`; at most one of `gelu` (exact) and `residual`. Where oneDNN's linear pays, one call
    that fuses the GELU or the add; elsewhere F.linear, then the GELU or the add."""
    if pays(x, weight):
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y
