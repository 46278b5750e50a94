"""models.rle off CUDA: `start_rles` and `rles_in_turn` give encode_masks' RLEs."""

from __future__ import annotations

import torch

from sam_fast_serve.models.rle import encode_masks, rles_in_turn, start_rles


def random_masks(seed: int, count: int = 3) -> torch.Tensor:
    return torch.rand(count, 20, 30, generator=torch.Generator().manual_seed(seed)) > 0.5


def test_start_rles_gives_encode_masks_answer() -> None:
    masks = random_masks(0)
    rles = start_rles(masks)
    masks.zero_()  # encoded already: later changes to the masks do not reach the RLEs
    assert rles() == encode_masks(random_masks(0))
    assert start_rles(torch.zeros(0, 4, 4, dtype=torch.bool))() == []


def test_rles_in_turn_gives_each_parts_rles_in_order() -> None:
    parts = [random_masks(seed, count) for seed, count in ((1, 3), (2, 1), (3, 2))]
    assert list(rles_in_turn(parts)) == [encode_masks(part) for part in parts]
    assert list(rles_in_turn([])) == []
