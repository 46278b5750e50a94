"""trunk.py against SAM 2's own Hiera: the same features in float32, its position embedding made
once and made again when the weights change; in bf16 weights, the features of any input dtype."""

from __future__ import annotations

import copy

import torch
from sam2.modeling.backbones.hieradet import Hiera

from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.build import build
from sam_fast_serve.models.sam2.trunk import ServedHiera, served_trunk, trunk_in


def _nets():
    theirs = build(model_type("test_sam2.1_hiera"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # SAM 2 starts them at zero
        for weights in (theirs.image_encoder.trunk.pos_embed, theirs.image_encoder.trunk.pos_embed_window):
            weights.copy_(torch.randn(weights.shape, generator=generator))
    ours = copy.deepcopy(theirs)
    return theirs, ours


def test_served_trunk_is_sam2s_to_the_bit():
    theirs, ours = _nets()
    assert served_trunk(ours) and not served_trunk(ours)
    assert type(ours.image_encoder.trunk) is ServedHiera and type(theirs.image_encoder.trunk) is Hiera
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = theirs.image_encoder.trunk(x)
        first, second = ours.image_encoder.trunk(x), ours.image_encoder.trunk(x)
    assert len(first) == len(want) >= 2
    for a, b, w in zip(first, second, want, strict=True):
        assert torch.equal(a, w) and torch.equal(b, w)
    trunk = ours.image_encoder.trunk
    assert trunk._get_pos_embed((64, 64)).data_ptr() == trunk._get_pos_embed((64, 64)).data_ptr()


def test_new_weights_make_the_embedding_again():
    theirs, ours = _nets()
    served_trunk(ours)
    trunk = ours.image_encoder.trunk
    before = trunk._get_pos_embed((64, 64)).clone()
    with torch.no_grad():
        theirs.image_encoder.trunk.pos_embed.mul_(2)
    ours.load_state_dict(theirs.state_dict())
    after = trunk._get_pos_embed((64, 64))
    assert not torch.equal(after, before)
    assert torch.equal(after, theirs.image_encoder.trunk._get_pos_embed((64, 64)))


def test_bf16_weights_take_any_input_dtype():
    theirs, ours = _nets()
    trunk_in(ours, torch.bfloat16)
    trunk = ours.image_encoder.trunk
    assert type(trunk) is ServedHiera
    assert {p.dtype for p in trunk.parameters()} == {torch.bfloat16}
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = theirs.image_encoder.trunk(x)
        got = trunk(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - w).norm() / w.norm()).item() < 0.03
