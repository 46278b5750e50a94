"""Building SAM 3 (Hugging Face transformers' Sam3Model) from a checkpoint folder, and writing one.

A SAM 3 checkpoint is the folder its publisher ships (the `facebook/sam3` form): config.json,
model.safetensors, processor_config.json, tokenizer.json, tokenizer_config.json. It is read offline,
never from a hub. The model and its processor (image resizing, the CLIP tokenizer) travel together
as a `Sam3Net`. Random weights come from the architecture's config alone; their tokenizer is CLIP's
byte-level BPE with no merges (every byte a token), which needs no vocabulary file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import CLIPTokenizer, Sam3Config, Sam3Model, Sam3Processor
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor
from transformers.utils.logging import disable_progress_bar

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.checkpoints import check_folder
from sam_fast_serve.models.precision import Precision
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.sam3.vision import faster_trunk

# The architectures by ModelType.build: the published one (transformers' defaults, 840M parameters,
# 1008 x 1008 input) and the test one, whose every stage runs at a small fraction of the FLOPs
# (336 x 336 input, a 4-layer trunk with two global layers, 20 queries).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sam3": {},
    "test_sam3": {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "global_attn_indexes": [1, 3],
                "image_size": 336,
                "window_size": 12,
            },
            "fpn_hidden_size": 32,
        },
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 64,
            # SAM 3's text length (Sam3Config's own text config has it; a config given replaces it).
            "max_position_embeddings": 32,
        },
        "geometry_encoder_config": {
            "hidden_size": 32,
            "num_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "detr_encoder_config": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        "detr_decoder_config": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_queries": 20,
        },
        "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
    },
}


@dataclass
class Sam3Net:
    """SAM 3's detector (`model`) and what prepares its inputs (`processor`); once prepared, the
    vision trunk it serves with (`trunk`: vision.py's, over the model's own weights)."""

    model: Sam3Model
    processor: Sam3Processor
    trunk: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device


def byte_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with a vocabulary of single bytes (and their end-of-word forms) and no
    merges: what random weights are paired with, as no vocabulary file can be downloaded here."""
    symbols = list(bytes_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _random(model: ModelType) -> Sam3Net:
    config = Sam3Config(**ARCHITECTURES[model.build])
    vision: Any = config.vision_config
    size = vision.image_size
    processor = Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": size, "width": size}), tokenizer=byte_tokenizer()
    )
    return Sam3Net(Sam3Model(config), processor)


def build(model: ModelType, checkpoint: str | None = None) -> Sam3Net:
    """`model` on the CPU in eval mode, float32: from the checkpoint folder `checkpoint` (offline),
    or with random weights when it is None. Raises ConfigError naming what the folder lacks."""
    # A worker's log wants no progress bars of loading (transformers prints them to stderr).
    disable_progress_bar()
    if checkpoint is None:
        net = _random(model)
    else:
        folder = Path(checkpoint)
        check_folder(folder, model)
        try:
            net = Sam3Net(
                Sam3Model.from_pretrained(folder, local_files_only=True, dtype=torch.float32),
                Sam3Processor.from_pretrained(folder, local_files_only=True),
            )
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise ConfigError(f"{folder} does not load as {model.name}: {str(exc).splitlines()[0][:300]}") from None
    net.model.eval()
    return net


def save_checkpoint(net: Sam3Net, path: Path) -> None:
    """Write `net` as a SAM 3 checkpoint folder at `path` (safetensors, config, processor, tokenizer)."""
    net.model.save_pretrained(path)
    net.processor.save_pretrained(path)


def prepare(net: Sam3Net, device: torch.device, precision: Precision, compile_encoder: bool = False) -> Sam3Net:
    """`net` on `device` with its faster vision trunk (vision.py); its dtype is applied at run time (autocast: the norms and softmax stay
    float32 where torch deems it needed). int8 and compile are SAM 1's (the config refuses them)."""
    assert not precision.int8 and not compile_encoder, "SAM 3 has no int8 encoder and no compiled one"
    model: Any = net.model  # transformers' typed `to` wraps the module's own
    model.to(device)
    net.trunk = faster_trunk(net.model.vision_encoder.backbone)
    return net
