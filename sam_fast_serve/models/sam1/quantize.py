"""int8 linear layers for the image encoder (`dtype: int8`), through oneDNN on x86 CPUs.

`quantize_image_encoder` gives every transformer block's linear layers (attention qkv and proj,
MLP lin1 and lin2) an int8 copy of their weight, quantized once: symmetric, one scale per output
channel, packed in oneDNN's layout. The fast blocks (fast_encoder.py) then compute those layers
with `int8_linear`: oneDNN's int8 matmul (`torch.ops.onednn.qlinear_pointwise`, the kernel
inductor uses for quantized CPU linears) with int32 accumulation on AMX or AVX512-VNNI, the bias,
GELU or residual add fused as in the float path, and the output in the activations' float dtype.
Everything else (attention matmuls, norms, neck) stays in that float dtype.

Activations are quantized on every call: one scale and zero point per tensor, from the tensor's
own min and max, to uint8. Per tensor because oneDNN's int8 linear takes a single source scale
(per-token scales would need a dequantizing pass over every output). Unsigned because without AMX
(AVX512-VNNI only: AMD Zen 4 and 5, Intel Ice Lake) oneDNN has fast int8 kernels for uint8
sources only: int8 sources fall back to its reference kernel, ~1000x slower.

Where it pays (vit_b, 1024 x 1024, 1 core, CPU seconds, benchmarks/bench_encoder.py): only where
bf16 matmuls lack AMX. With AMX (Intel Sapphire Rapids and later) int8 matmuls are 1.5-2.5x
faster than bf16 ones, but quantizing the activations (4 passes over them) costs as much as that
saves: encoder 2.66 s vs bf16 2.59 s. With AVX512-BF16 and VNNI but no AMX (the same CPU with
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), bf16 matmuls reach ~110 GFLOP/s and int8 ones ~700: encoder
5.9 s vs 10.7 s.

Where int8 loses accuracy: one scale covers a whole tensor, so a few large activations (outlier
channels, common in trained ViTs) leave few levels for all the others. On random weights, which
have no such outliers, the embedding's relative error to fp32 is 0.018 (bf16: 0.011) and all
automatic masks stay at IoU >= 0.9 with the fp32 reference's, 66% at >= 0.99 (bf16: 82%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor, nn

# Activation levels: 254 steps of uint8's 255, as the zero point is rounded up (so that the lowest
# value lands at 0, not at -1) and may lift the highest by up to a step: to 255, never 256.
_ACTIVATION_STEPS = 254
# The narrowest activation range quantized as such (an all-zero tensor gets this one): 1 / scale
# stays well inside fp32.
_SMALLEST_RANGE = 1e-30
# See quantize_activations.
_ROUNDING_OFFSET = 1.5 * 2**23
# Bytes of fp32 intermediates per step of `quantize_activations`. Whole, lin2's input (4096 x 3072)
# takes 48 MiB, above glibc's largest mmap threshold (32 MiB), page-faulted in afresh on every
# call. Measured on 1 core, quantizing it took 31 ms whole, 16 ms in 8 MiB chunks, 13 ms in
# 2 MiB ones (which stay in L2 between their passes; 1 MiB: the same).
_QUANTIZE_CHUNK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear layer's weight as oneDNN's int8 linear takes it: weight ~= int8 x scales."""

    packed: Tensor  # int8 (out, in), in oneDNN's blocked layout (an opaque mkldnn tensor)
    scales: Tensor  # fp32 (out,)
    zero_points: Tensor  # int32 zeros (out,): the weight is quantized symmetrically
    bias: Tensor | None  # fp32 (out,)

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None) -> QuantizedWeight:
        """Quantize a float (out, in) weight per output channel to [-127, 127]."""
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        quantized = torch.round(weight / scales[:, None]).to(torch.int8)
        return cls(
            packed=torch.ops.onednn.qlinear_prepack(quantized, None),
            scales=scales,
            zero_points=torch.zeros(weight.shape[0], dtype=torch.int32),
            bias=None if bias is None else bias.detach().float(),
        )


class Int8Linear(nn.Linear):
    """An `nn.Linear` that also holds its weight quantized (`int8`), for `int8_linear`.

    It holds the float layer's own weight and bias Parameters, so the state_dict keys and values
    are the float layer's. Called as a module it computes the float layer; the encoder's fast
    blocks call `int8_linear` instead where oneDNN runs (fast_encoder._linear). The int8 weight is
    taken when the layer is made: loading new float weights afterwards does not change it.
    """

    def __init__(self, layer: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight
        self.register_parameter("bias", layer.bias)
        self.int8 = QuantizedWeight.of(self.weight, self.bias)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's packed weight can be neither copied nor pickled: a copy quantizes its own weight.
        return {name: value for name, value in self.__dict__.items() if name != "int8"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.int8 = QuantizedWeight.of(self.weight, self.bias)


def quantize_image_encoder(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Give, in place, each block's qkv, proj, lin1 and lin2 layers an int8 weight (`Int8Linear`).

    In: a segment_anything `ImageEncoderViT` on the CPU, its blocks plain or fast (quantizing
    after `accelerate_image_encoder` or before makes no difference), in its final float dtype (the
    int8 weights are quantized from the weights as they are now). Out: the same encoder. The
    state_dict keys do not change. Calling it again is a no-op.
    """
    for block in encoder.blocks:
        for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "lin1"), (block.mlp, "lin2")):
            layer = getattr(owner, name)
            if not isinstance(layer, Int8Linear):
                setattr(owner, name, Int8Linear(layer))
    return encoder


def quantize_activations(x: Tensor) -> tuple[Tensor, float, int]:
    """x (float, (..., C)) -> (q, scale, zero_point): uint8 q with x ~= scale * (q - zero_point).

    The range spans x's min and max and always 0, so zeros (the padding of attention windows)
    stay exact. Each value is rounded once, to the nearest level.
    """
    low, high = (value.item() for value in torch.aminmax(x))
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, _SMALLEST_RANGE) / _ACTIVATION_STEPS
    # ceil: the lowest value lands at 0 or above, never at -1 (which would wrap to 255).
    zero_point = math.ceil(-low / scale)
    # Rounding without a rounding pass (torch.round is slow in bf16): in [2**23, 2**24) fp32 holds
    # exactly the integers, so fp32(1.5 * 2**23 + zero_point + x / scale) is the level rounded to
    # nearest, and the low byte of its bits is the level.
    offset = torch.tensor(_ROUNDING_OFFSET + zero_point)
    rows = x.reshape(-1, x.shape[-1])
    quantized = torch.empty(rows.shape, dtype=torch.uint8, device=x.device)
    step = max(1, _QUANTIZE_CHUNK_BYTES // (4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        shifted = rows[start : start + step].to(torch.float32, copy=True)
        torch.add(offset, shifted, alpha=1.0 / scale, out=shifted)
        quantized[start : start + step] = shifted.view(torch.int32)
    return quantized.view(x.shape), scale, zero_point


def int8_linear(x: Tensor, layer: Int8Linear, gelu: bool = False, residual: Tensor | None = None) -> Tensor:
    """[residual +] [gelu](layer(x)) with int8 arithmetic; at most one of `gelu` and `residual`.

    In: x (..., in) in bf16 or fp32 on the CPU, residual (..., out) in x's dtype. Out: (..., out)
    in x's dtype. Call it without autograd (oneDNN's int8 linear has no backward).
    """
    q, scale, zero_point = quantize_activations(x)
    weight = layer.int8
    if residual is not None:
        # contiguous: a strided residual (the first block's, the patch embedding permuted) sends
        # oneDNN to its reference kernel, ~1000x slower.
        return torch.ops.onednn.qlinear_pointwise.binary(
            q, scale, zero_point, weight.packed, weight.scales, weight.zero_points, residual.contiguous(),
            weight.bias, 1.0, 0, x.dtype, 1.0, 0, "add", 1.0, "none", [], "",
        )  # fmt: skip
    post_op, algorithm = ("gelu", "none") if gelu else ("none", "")
    return torch.ops.onednn.qlinear_pointwise(
        q, scale, zero_point, weight.packed, weight.scales, weight.zero_points, weight.bias,
        1.0, 0, x.dtype, post_op, [], algorithm,
    )  # fmt: skip
