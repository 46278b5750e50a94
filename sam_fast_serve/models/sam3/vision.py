"""SAM 3's vision trunk (Sam3ViTModel) computed with less memory traffic, the same weights.

Its 32 layers are windowed (24 x 24 windows of a 72 x 72 grid) but for four global ones. The
reference partitions a layer's normed input into windows and puts the output back, every layer;
here the residual stream stays in window order through each run of windowed layers (norms,
projections and MLPs work token by token, so the order changes nothing) and is put back before a
global layer. The query, key and value projections are one product; the rotary position
encoding, computed once per layer instead of per call, rotates each (even, odd) pair of a head as
one complex product; the MLP's GELU and the residual adds go into oneDNN's linear where it pays
(models.onednn).

The window order needs windows that tile the grid, and the fused MLP the exact GELU: a trunk
without them keeps the reference's forward (`faster_trunk`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.sam3.modeling_sam3 import (
    Sam3ViTLayer,
    Sam3ViTModel,
    window_partition,
    window_unpartition,
)

from sam_fast_serve.models import onednn


class FastViTLayer(nn.Module):
    """One Sam3ViTLayer on (B, N, C) tokens: N the whole grid's (global) or one window's (windowed)."""

    def __init__(self, layer: Sam3ViTLayer, grid: int) -> None:
        super().__init__()
        self.layer = layer
        attention = layer.attention
        self.heads = attention.num_attention_heads
        self.scaling = attention.scaling
        self.windowed: bool = layer.window_size > 0
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv_weight = torch.cat([p.weight.detach() for p in projections])
        self.qkv_bias = torch.cat([p.bias.detach() for p in projections])
        # The three projections become views of the fused weights: no second copy (400 MB at full size).
        for i, projection in enumerate(projections):
            rows = slice(i * projection.out_features, (i + 1) * projection.out_features)
            projection.weight = nn.Parameter(self.qkv_weight[rows], requires_grad=False)
            projection.bias = nn.Parameter(self.qkv_bias[rows], requires_grad=False)
        side = layer.window_size if self.windowed else grid
        cos, sin = layer.rotary_emb(
            torch.empty(0, device=layer.position_ids.device), layer.position_ids
        )  # (1, N, head_dim), pairs repeated
        self.rotation = torch.complex(cos[0, :, ::2], sin[0, :, ::2]).view(side * side, -1)

    def rotate(self, x: Tensor) -> Tensor:
        """The rotary encoding of (B, heads, N, head_dim) `x`, in float32 as the reference's."""
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * self.rotation).flatten(-2).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        batch, tokens, channels = x.shape
        qkv = F.linear(layer.layer_norm1(x), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v, scale=self.scaling)
        attended = attended.transpose(1, 2).reshape(batch, tokens, channels)
        output = layer.attention.o_proj
        x = onednn.linear(attended, output.weight, output.bias, residual=x)
        mlp = layer.mlp
        hidden = onednn.linear(layer.layer_norm2(x), mlp.fc1.weight, mlp.fc1.bias, gelu=True)
        return onednn.linear(hidden, mlp.fc2.weight, mlp.fc2.bias, residual=x)


class FastTrunk(nn.Module):
    """Sam3ViTModel's forward (pixels -> (B, H*W, C) tokens) with FastViTLayers (module doc)."""

    def __init__(self, trunk: Sam3ViTModel, grid: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.grid = grid
        config: Any = trunk.config
        self.window = config.window_size
        layers: list[Any] = list(trunk.layers)
        self.layers = [FastViTLayer(layer, grid) for layer in layers]

    def forward(self, pixel_values: Tensor) -> Tensor:
        trunk, grid, window = self.trunk, self.grid, self.window
        x = trunk.embeddings(pixel_values)
        batch, channels = x.shape[0], x.shape[-1]
        x = trunk.layer_norm(x.view(batch, grid, grid, channels))
        partitioned = False
        for layer in self.layers:
            if layer.windowed and not partitioned:
                x = window_partition(x.view(batch, grid, grid, channels), window)[0].view(-1, window * window, channels)
            elif not layer.windowed and partitioned:
                x = window_unpartition(x.view(-1, window, window, channels), window, (grid, grid), (grid, grid))
            if not layer.windowed:
                x = x.reshape(batch, grid * grid, channels)
            partitioned = layer.windowed
            x = layer(x)
        if partitioned:
            x = window_unpartition(x.view(-1, window, window, channels), window, (grid, grid), (grid, grid))
        return x.reshape(batch, grid * grid, channels)


class ReferenceTrunk(nn.Module):
    """Sam3ViTModel's own forward, answering tokens as FastTrunk does."""

    def __init__(self, trunk: Sam3ViTModel) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.trunk(pixel_values).last_hidden_state


def faster_trunk(trunk: Sam3ViTModel) -> nn.Module:
    """A FastTrunk over `trunk`'s weights, or its own forward (ReferenceTrunk) where the windows do not tile its grid
    or its MLP's activation is not the exact GELU the fast layers fuse."""
    config: Any = trunk.config
    grid = config.image_size // config.patch_size
    if grid % config.window_size or config.hidden_act != "gelu":
        return ReferenceTrunk(trunk)
    return FastTrunk(trunk, grid)
