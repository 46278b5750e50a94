"""onednn.py: a @ b^T by oneDNN's linear where it pays, torch.matmul's result either way."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from sam_fast_serve.models import onednn


def ran_onednn(call) -> bool:
    """Whether `call()` ran oneDNN's linear (the profiler's record of the aten calls)."""
    with profile() as recorded:
        call()
    return any(event.name == "mkldnn::_linear_pointwise" for event in recorded.events())


@pytest.mark.parametrize(
    "a_shape,b_shape,single",
    [
        ((5, 7), (3, 7), True),
        ((1, 5, 7), (1, 3, 7), True),
        ((2, 4, 5, 7), (1, 1, 3, 7), True),
        ((2, 5, 7), (2, 3, 7), False),
        ((5, 7), (1, 3, 7), False),
    ],
    ids=["matrices", "one-batch-row", "one-head-broadcast", "a-batch-of-b", "b-wider-than-a"],
)
def test_equal_to_matmul_and_onednn_only_for_one_matrix(a_shape, b_shape, single):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)
    want = torch.matmul(a.double(), b.double().transpose(-1, -2))
    got = onednn.matmul_transposed(a, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert ran_onednn(lambda: onednn.matmul_transposed(a, b)) == (single and onednn.pays(a, b))


def test_applies_to_float32_on_x86_cpus_only_outside_autograd_and_autocast():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert onednn.applies(x, w) == (onednn._X86 and torch.backends.mkldnn.is_available())
    assert not onednn.applies(x.double(), w.double())
    with torch.autocast("cpu", torch.bfloat16):
        assert not onednn.applies(x, w)
    x.requires_grad_()
    assert not onednn.applies(x, w)
    with torch.no_grad():
        assert onednn.applies(x, w) == onednn.applies(x.detach(), w)


def test_pays_in_float32_only_where_aten_runs_avx512_kernels():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert onednn.pays(x, w) == (onednn.applies(x, w) and avx512)
    assert not onednn.pays(x.double(), w.double())
    bf16 = x.bfloat16(), w.bfloat16()
    assert onednn.pays(*bf16) == onednn.applies(*bf16)


@pytest.mark.parametrize("fused", ["none", "gelu", "residual"])
def test_linear_is_the_layer_with_its_gelu_or_residual_add(fused):
    generator = torch.Generator().manual_seed(2)
    x, weight, bias, residual = (
        torch.randn(shape, generator=generator) for shape in ((6, 5, 8), (4, 8), (4,), (6, 5, 4))
    )
    want = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    if fused == "gelu":
        want = torch.nn.functional.gelu(want)
    if fused == "residual":
        want = want + residual.double()
    options = {"gelu": fused == "gelu", "residual": residual if fused == "residual" else None}
    got = onednn.linear(x, weight, bias, **options)
    assert got.shape == (6, 5, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert ran_onednn(lambda: onednn.linear(x, weight, bias, **options)) == onednn.pays(x, weight)
