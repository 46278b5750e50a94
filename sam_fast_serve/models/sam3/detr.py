"""SAM 3's DETR encoder with its first self-attention moved to the image's side.

Each encoder layer attends the image's tokens to themselves, then to the prompt, then runs its MLP.
The first layer's self-attention reads the image's features and their positions only, so it is
computed once with the image's features and kept in its embedding (`image_part`); a concept runs
the rest (`concept_part`). The same modules and weights as Sam3DetrEncoder, in its order.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.sam3.modeling_sam3 import Sam3DetrEncoder


def flattened(level: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C), as Sam3DetrEncoder flattens a level."""
    return level.flatten(2).transpose(1, 2)


def image_part(encoder: Sam3DetrEncoder, features: Tensor, positions: Tensor) -> Tensor:
    """The first layer's self-attention block on (B, N, C) image tokens and their positions."""
    layer: Any = encoder.layers[0]
    normed = layer.layer_norm1(features)
    with_positions = normed + positions
    attended, _ = layer.self_attn(query=with_positions, key=with_positions, value=normed)
    return features + attended


def concept_part(
    encoder: Sam3DetrEncoder, first: Tensor, positions: Tensor, prompt: Tensor, prompt_mask: Tensor
) -> Tensor:
    """The encoder's output (K, N, C) for K concepts' prompt features (K, L, C) and their validity
    mask (K, L), from `image_part`'s output (K, N, C) and the image tokens' positions."""
    attention_mask = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=first, attention_mask=prompt_mask, encoder_hidden_states=prompt
    )
    layers: list[Any] = list(encoder.layers)
    first_layer = layers[0]
    normed = first_layer.layer_norm2(first)
    attended, _ = first_layer.cross_attn(query=normed, key=prompt, value=prompt, attention_mask=attention_mask)
    hidden = first + attended
    hidden = hidden + first_layer.mlp(first_layer.layer_norm3(hidden))
    for layer in layers[1:]:
        hidden = layer(
            hidden, prompt_feats=prompt, vision_pos_encoding=positions, prompt_cross_attn_mask=attention_mask
        )
    return hidden
