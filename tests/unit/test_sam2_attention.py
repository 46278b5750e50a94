"""attention.py against softmax attention written out and SAM 2's own Hiera attention. In float64
both ways of computing it (the fused kernel, the blocks of queries) are exact to rounding, so the
comparisons are tight; bf16 is held to bf16's precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from torch.profiler import profile

from sam_fast_serve.models import onednn
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.attention import (
    FLOAT32_QUERY_BLOCK,
    FUSED_BF16_ON_CPU,
    QUERY_BLOCK,
    HieraAttention,
    attend,
    attend_fused,
    attend_in_blocks,
    faster_hiera,
)
from sam_fast_serve.models.sam2.build import build


@pytest.mark.parametrize(
    "queries,keys,width",
    [(49, 49, 8), (QUERY_BLOCK, 300, 8), (2 * QUERY_BLOCK + 17, 600, 8), (300, 700, 3)],
    ids=["one-product", "one-block", "blocks-and-a-rest", "narrow-values"],
)
@pytest.mark.parametrize("attention", [attend_in_blocks, attend_fused])
def test_both_ways_are_softmax_attention(attention, queries, keys, width):
    generator = torch.Generator().manual_seed(queries)
    q = torch.randn(2, 3, queries, 8, dtype=torch.float64, generator=generator)
    k = torch.randn(2, 3, keys, 8, dtype=torch.float64, generator=generator)
    v = torch.randn(2, 3, keys, width, dtype=torch.float64, generator=generator)
    want = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    got = attention(q, k, v)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    half = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), want, rtol=0, atol=0.05)


def test_float32_on_the_cpu_is_torchs_fused_attention_for_values_as_wide_as_keys():
    q, k, v = torch.randn(3, 1, 2, 64, 16).unbind(0)
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(attend(q, k, v[..., :4]), attend_in_blocks(q, k, v[..., :4]))


def test_bf16_on_the_cpu_is_fused_only_with_amx():
    q, k, v = torch.randn(3, 1, 2, 600, 16).bfloat16().unbind(0)
    chosen = attend_fused if FUSED_BF16_ON_CPU else attend_in_blocks
    assert torch.equal(attend(q, k, v), chosen(q, k, v))
    assert FUSED_BF16_ON_CPU == torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("pooled", [False, True])
def test_hiera_attention_is_sam2s(pooled):
    torch.manual_seed(0)
    theirs = MultiScaleAttention(12, 24, 3, q_pool=torch.nn.MaxPool2d(2, 2) if pooled else None).double()
    ours = MultiScaleAttention(12, 24, 3, q_pool=theirs.q_pool).double()
    ours.load_state_dict(theirs.state_dict())
    ours.__class__ = HieraAttention
    x = torch.randn(2, 6, 8, 12, dtype=torch.float64)
    want = theirs(x)
    assert want.shape == ((2, 3, 4, 24) if pooled else (2, 6, 8, 24))
    torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-10)
    with torch.autocast("cpu", torch.bfloat16):
        half = ours.float()(x.float())
    torch.testing.assert_close(half.double(), want, rtol=0, atol=0.05 * want.abs().max().item())


def test_faster_hiera_changes_every_block_once():
    net = build(model_type("test_sam2.1_hiera"))
    blocks = len(net.image_encoder.trunk.blocks)
    assert faster_hiera(net) == blocks >= 1
    assert all(type(block.attn) is HieraAttention for block in net.image_encoder.trunk.blocks)
    assert faster_hiera(net) == 0


def test_one_heads_blocks_weigh_its_values_by_onednn_where_it_pays():
    """The memory attention's case: one head, values narrower than keys, float32, in blocks."""
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, n, 16, generator=generator) for n in (2 * FLOAT32_QUERY_BLOCK + 5, 700))
    v = torch.randn(1, 1, 700, 4, generator=generator)
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, dim=-1) @ v.double()
    torch.testing.assert_close(attend(q, k, v).double(), want, rtol=1e-5, atol=1e-5)
    with profile() as recorded:
        attend(q, k, v)
    weighed = sum(event.name == "mkldnn::_linear_pointwise" for event in recorded.events())
    assert weighed == (3 if onednn.pays(q, v) else 0)  # one a block
