"""positions.py against SAM 2's own PositionEmbeddingSine: the same values, no copy a call."""

from __future__ import annotations

import copy

import pytest
import torch
from sam2.modeling.position_encoding import PositionEmbeddingSine

from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.build import build
from sam_fast_serve.models.sam2.positions import CachedSinePositions, cached_positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 16, 16), (3, 64, 8, 12)])
def test_cached_positions_are_sam2s(shape, dtype):
    theirs = PositionEmbeddingSine(64)
    ours = copy.deepcopy(theirs)
    ours.__class__ = CachedSinePositions
    x = torch.zeros(shape, dtype=dtype)
    want = theirs(x).to(dtype)
    first, second = ours(x), ours(x)
    assert first.dtype == dtype and first.shape == want.shape == (shape[0], 64, *shape[2:])
    assert torch.equal(first, want) and torch.equal(second, want)
    assert first.data_ptr() == second.data_ptr()  # served from the cache, not copied


def test_cached_positions_reach_both_encoders():
    net = build(model_type("test_sam2.1_hiera"))
    assert cached_positions(net) == 2
    assert type(net.image_encoder.neck.position_encoding) is CachedSinePositions
    assert type(net.memory_encoder.position_encoding) is CachedSinePositions
