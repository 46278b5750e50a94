"""neck.py against SAM 2's forward_image: the high-resolution features of the folded convolutions
equal SAM 2's two in a row, to float32 rounding; the rest of its output is untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.build import build
from sam_fast_serve.models.sam2.neck import FoldedConv, Passed, fold_high_res


def _features(net, x):
    with torch.inference_mode():
        out = net.forward_image(x)
    return [*out["backbone_fpn"], *out["vision_pos_enc"]]


def test_folded_features_are_sam2s():
    theirs = build(model_type("test_sam2.1_hiera"))
    ours = copy.deepcopy(theirs)
    assert fold_high_res(ours) == 2 and fold_high_res(ours) == 0
    assert type(ours.sam_mask_decoder.conv_s0) is Passed and type(ours.sam_mask_decoder.conv_s1) is Passed
    assert sum(type(m) is FoldedConv for m in ours.image_encoder.neck.modules()) == 2
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    want, got = _features(theirs, x), _features(ours, x)
    assert len(got) == len(want) == 6
    assert [g.shape for g in got] == [w.shape for w in want]
    assert got[0].shape[1] == theirs.sam_mask_decoder.conv_s0.out_channels
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    with torch.autocast("cpu", torch.bfloat16):
        half = _features(ours, x)
    for h, w in zip(half[:3], want[:3], strict=True):
        assert ((h.float() - w).norm() / w.norm()).item() < 0.02


def test_new_decoder_weights_fold_again():
    theirs = build(model_type("test_sam2.1_hiera"))
    ours = copy.deepcopy(theirs)
    fold_high_res(ours)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    _features(ours, x)
    with torch.no_grad():
        theirs.sam_mask_decoder.conv_s0.weight.mul_(-3)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(_features(ours, x)[0], _features(theirs, x)[0], rtol=1e-5, atol=1e-5)


def test_nothing_folds_without_high_res_features():
    net = build(model_type("test_sam2.1_hiera"))
    net.use_high_res_features_in_sam = False
    assert fold_high_res(net) == 0
    assert type(net.sam_mask_decoder.conv_s0) is nn.Conv2d
