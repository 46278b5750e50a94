"""SAM 3's pixel decoder and mask head, split into the image's part and the concept's part.

Sam3PixelDecoder climbs from the DETR encoder's output (per concept) to the neck's finest level:
at each step `relu(norm(conv3x3(upsample2x_nearest(x) + level)))`. The convolution is linear, so
it is `conv(upsample(x)) + conv(level)`: the second term depends on the image alone and is
computed once with its features (`image_part`), the first per concept (`concept_part`). A 3 x 3
convolution of a nearest-upsampled map is four 2 x 2 convolutions of the map itself, one per
output phase (row and column parity), their taps summed where two land on the same source
pixel: 16 taps at the low resolution instead of 9 at the high one (2.25x fewer FLOPs).

The mask head's 1 x 1 instance projection is folded into each kept query's mask embedding, so a
mask is one product with the pixel embedding, made for the queries kept only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.sam3.modeling_sam3 import Sam3MaskDecoder, Sam3PixelDecoder


def _pairs(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """A 3-tap kernel along `dim` as the two 2-tap kernels that apply it to a nearest-upsampled
    input: even outputs read source pixels (i - 1, i), odd ones (i, i + 1)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def phase_kernels(weight: Tensor) -> Tensor:
    """(4 Co, Ci, 2, 2): the 2 x 2 kernels of each output phase (row parity, column parity) of a
    3 x 3 convolution (padding 1) applied after a 2x nearest upsampling."""
    kernels: list[Tensor] = []
    for rows in _pairs(weight, 2):
        kernels.extend(_pairs(rows, 3))
    return torch.cat(kernels, 0)


def conv_of_upsampled(x: Tensor, kernels: Tensor) -> Tensor:
    """conv3x3(upsample2x_nearest(x)) without the bias, from `phase_kernels`: (K, Ci, H, W) ->
    (K, Co, 2H, 2W)."""
    count, _, height, width = x.shape
    channels = kernels.shape[0] // 4
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels).view(count, 2, 2, channels, height + 1, width + 1)
    out = x.new_empty(count, channels, 2 * height, 2 * width)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = phases[:, a, b, :, a : a + height, b : b + width]
    return out


class PixelDecoder(nn.Module):
    """The pixel decoder of `decoder` in two parts (module doc), with the same weights."""

    def __init__(self, decoder: Sam3PixelDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        # Step i of the climb adds the neck level 1 - i (the finest last).
        convs: list[Any] = list(decoder.conv_layers)
        self.kernels = [phase_kernels(conv.weight.detach()) for conv in convs[:2]]

    def image_part(self, levels: list[Tensor]) -> list[Tensor]:
        """The neck's levels 0 and 1 (B, C, H, W) as the climb adds them: each through the
        convolution of the step that reads it, bias included."""
        convs: list[Any] = list(self.decoder.conv_layers)
        return [convs[1](levels[0]), convs[0](levels[1])]

    def concept_part(
        self, head: Sam3MaskDecoder, encoded: Tensor, levels: list[Tensor], prompt: Tensor, prompt_mask: Tensor
    ) -> Tensor:
        """The pixel embeddings (K, C, H, W) of K concepts: the DETR encoder's output (K, N, C)
        attends to the concepts' prompt features (K, L, C) (Sam3MaskDecoder's cross-attention),
        then climbs the levels (`image_part`'s levels 0 and 1, the raw level 2)."""
        normed = head.prompt_cross_attn_norm(encoded)
        attention_mask = create_bidirectional_mask(
            config=head.config, inputs_embeds=normed, encoder_hidden_states=prompt, attention_mask=prompt_mask
        )
        attended, _ = head.prompt_cross_attn(query=normed, key=prompt, value=prompt, attention_mask=attention_mask)
        encoded = encoded + attended
        count, channels, side = encoded.shape[0], encoded.shape[-1], levels[2].shape[-1]
        x = encoded[:, : side * side].transpose(1, 2).reshape(count, channels, side, side)
        for step, level in enumerate((levels[1], levels[0])):
            x = conv_of_upsampled(x, self.kernels[step].to(x.dtype)) + level
            x = F.relu(self.decoder.norms[step](x))
        return x

    @staticmethod
    def masks(head: Sam3MaskDecoder, queries: Tensor, pixel_embed: Tensor) -> Tensor:
        """Mask logits (n, H, W) of n queries (n, C) on one concept's pixel embedding (C, H, W):
        Sam3MaskDecoder's einsum of the mask embeddings with the instance projection, folded."""
        embedded = head.mask_embedder(queries)
        projection: nn.Conv2d = head.instance_projection
        assert projection.bias is not None
        weight = projection.weight[:, :, 0, 0]
        folded = embedded @ weight.to(embedded.dtype)
        bias = embedded @ projection.bias.to(embedded.dtype)
        channels, height, width = pixel_embed.shape
        logits = folded @ pixel_embed.reshape(channels, height * width).to(folded.dtype)
        return (logits + bias[:, None]).view(len(queries), height, width)
