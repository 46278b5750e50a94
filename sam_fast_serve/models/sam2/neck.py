"""SAM 2's high-resolution features in one 1x1 convolution each instead of two.

Where SAM 2 uses high-resolution features (`use_high_res_features_in_sam`), the neck maps each of
the trunk's two finest levels to 256 channels by a 1x1 convolution, with no top-down path there
(they are not in `fpn_top_down_levels`), and forward_image at once maps them on to 32 and 64
channels by the mask decoder's 1x1 convolutions `conv_s0` and `conv_s1`. Two 1x1 convolutions in a
row are one: W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2). Here the neck's convolution of those
levels computes the folded one and the decoder's two pass their input on, so the 256-channel map at
a quarter of the image's side (16.7 M values for a 1024 x 1024 image) is never made; the same sums,
rounded once fewer. The two modules keep their weights and names (checkpoints are unchanged).

- `fold_high_res(net)`: fold them where `net` allows; how many levels it folded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import SAM2Base
from torch import nn

from sam_fast_serve.models.sam2.positions import values_key

__all__ = ["fold_high_res"]


def _one_by_one(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.bias is not None
    )


class FoldedConv(nn.Conv2d):
    """A neck's 1x1 convolution followed by `then` (the decoder's, set by `fold_high_res`), as one
    1x1 convolution; the folded weights are made again when either's weights change."""

    then: nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, then = self, self.then
        assert first.bias is not None and then.bias is not None  # fold_high_res folds only such
        key = values_key(first.weight, first.bias, then.weight, then.bias)
        kept = self.__dict__.get("_folded")
        if kept is None or kept[0] != key:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # folded in the weights' dtype
                outer = then.weight.flatten(1)  # (out, mid)
                weight = (outer @ first.weight.flatten(1))[:, :, None, None]
                bias = outer @ first.bias + then.bias
            kept = self.__dict__["_folded"] = (key, weight, bias)
        return F.conv2d(x, kept[1], kept[2])


class Passed(nn.Conv2d):
    """The decoder's 1x1 convolution of a level the neck already applied it to: its input, as is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fold_high_res(net: SAM2Base) -> int:
    """Fold the decoder's conv_s0 and conv_s1 into the neck's convolutions of levels 0 and 1 of
    `net` where SAM 2 applies them (high-resolution features on), both are 1x1 with a bias and the
    level has no top-down path; how many levels it folded (0 where it did not, or already had)."""
    if not net.use_high_res_features_in_sam:
        return 0
    neck, decoder = net.image_encoder.neck, net.sam_mask_decoder
    n = len(neck.convs) - 1
    folded = 0
    for level, then in ((0, decoder.conv_s0), (1, decoder.conv_s1)):
        first = neck.convs[n - level].conv
        if level in neck.fpn_top_down_levels or not (_one_by_one(first) and _one_by_one(then)):
            continue
        first.__class__ = FoldedConv
        first.__dict__["then"] = then  # a reference, not a submodule: the weights stay the decoder's
        then.__class__ = Passed
        folded += 1
    return folded
