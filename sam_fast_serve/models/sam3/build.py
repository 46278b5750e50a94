"""Building SAM 3 (Hugging Face transformers' Sam3Model) from a checkpoint folder, and writing one.

A SAM 3 checkpoint is the folder its publisher ships (the `facebook/sam3` form): config.json,
model.safetensors, processor_config.json, tokenizer.json, tokenizer_config.json. Its model is
transformers' Sam3VideoModel: the detector (Sam3Model: concepts), the tracker (points, boxes and
mask prompts, and video memory) and the tracker's own neck over the detector's vision trunk. A
folder saved from Sam3Model alone loads too, and answers concepts only. It is read offline, never
from a hub. The model and its processor (image resizing, the CLIP tokenizer) travel together as a
`Sam3Net`. Random weights come from the architecture's config alone; their tokenizer is CLIP's
byte-level BPE with no merges (every byte a token), which needs no vocabulary file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import CLIPTokenizer, Sam3Config, Sam3Model, Sam3Processor, Sam3VideoConfig, Sam3VideoModel
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor
from transformers.utils.logging import disable_progress_bar

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.checkpoints import check_folder
from sam_fast_serve.models.precision import Precision
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.sam3.vision import faster_trunk

# The architectures by ModelType.build: the detector's and the tracker's configs (their input side
# is the model type's). The published one is transformers' defaults (860M parameters, of which the
# tracker's prompt encoder, mask decoder and video memory 12M and its neck 8M); the test one runs
# every stage at a small fraction of the FLOPs (a 4-layer trunk with two global layers, 20 queries,
# a 32-channel neck and tracker).
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "sam3": {"detector": {}, "tracker": {}},
    "test_sam3": {
        "detector": {
            "vision_config": {
                "backbone_config": {
                    "model_type": "sam3_vit_model",
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 4,
                    "num_attention_heads": 2,
                    "global_attn_indexes": [1, 3],
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
            "detr_encoder_config": {
                "hidden_size": 32,
                "num_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            },
            "detr_decoder_config": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "num_queries": 20,
            },
            "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
        },
        "tracker": {
            "prompt_encoder_config": {"hidden_size": 32},
            "mask_decoder_config": {
                "hidden_size": 32,
                "mlp_dim": 64,
                "num_attention_heads": 2,
                "iou_head_hidden_dim": 32,
            },
            "memory_attention_hidden_size": 32,
            "memory_attention_num_layers": 1,
            "memory_attention_feed_forward_hidden_size": 64,
            "memory_encoder_hidden_size": 32,
            "memory_encoder_output_channels": 16,
            "mask_downsampler_embed_dim": 32,
            "memory_fuser_embed_dim": 32,
            "memory_fuser_intermediate_dim": 64,
            "memory_fuser_num_layers": 1,
        },
    },
}


@dataclass
class Sam3Net:
    """SAM 3's detector (`model`) and what prepares its inputs (`processor`); `video`, the whole
    published model (detector, tracker and the tracker's neck) where the checkpoint holds it, else
    None (a folder saved from the detector alone: it answers concepts only); once prepared, the
    vision trunk it serves with (`trunk`: vision.py's, over the detector's own weights)."""

    model: Sam3Model
    processor: Sam3Processor
    video: Sam3VideoModel | None = None
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
    architecture = ARCHITECTURES[model.build]
    detector = Sam3Config(**architecture["detector"])
    vision: Any = detector.vision_config
    config = Sam3VideoConfig(
        detector_config=detector.to_dict(),
        tracker_config={"vision_config": vision.to_dict(), **architecture["tracker"]},
    )
    config.image_size = model.input_side
    side = model.input_side
    processor = Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": side, "width": side}), tokenizer=byte_tokenizer()
    )
    video = Sam3VideoModel(config)
    return Sam3Net(video.detector_model, processor, video)


def _load(folder: Path) -> Sam3Net:
    """The folder's model: the whole published one (config model_type sam3_video), or a detector
    saved alone (sam3)."""
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    processor = Sam3Processor.from_pretrained(folder, local_files_only=True)
    if kind == "sam3_video":
        video = Sam3VideoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        return Sam3Net(video.detector_model, processor, video)
    if kind == "sam3":
        return Sam3Net(Sam3Model.from_pretrained(folder, local_files_only=True, dtype=torch.float32), processor)
    raise ValueError(f"its config.json has model_type {kind!r}, not sam3_video (as published) or sam3")


def build(model: ModelType, checkpoint: str | None = None) -> Sam3Net:
    """`model` on the CPU in eval mode, float32: from the checkpoint folder `checkpoint` (offline),
    or with random weights (the published form, tracker included) when it is None. Raises
    ConfigError naming what the folder lacks."""
    # A worker's log wants no progress bars of loading (transformers prints them to stderr).
    disable_progress_bar()
    if checkpoint is None:
        net = _random(model)
    else:
        folder = Path(checkpoint)
        check_folder(folder, model)
        try:
            net = _load(folder)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise ConfigError(f"{folder} does not load as {model.name}: {str(exc).splitlines()[0][:300]}") from None
    (net.video or net.model).eval()
    return net


def save_checkpoint(net: Sam3Net, path: Path) -> None:
    """Write `net` as a SAM 3 checkpoint folder at `path` (safetensors, config, processor,
    tokenizer): the whole model where `net` has it, else the detector alone."""
    (net.video or net.model).save_pretrained(path)
    net.processor.save_pretrained(path)


def prepare(net: Sam3Net, device: torch.device, precision: Precision, compile_encoder: bool = False) -> Sam3Net:
    """`net` on `device` with its faster vision trunk (vision.py); its dtype is applied at run time (autocast: the norms and softmax stay
    float32 where torch deems it needed). int8 and compile are SAM 1's (the config refuses them)."""
    assert not precision.int8 and not compile_encoder, "SAM 3 has no int8 encoder and no compiled one"
    model: Any = net.video or net.model  # transformers' typed `to` wraps the module's own
    model.to(device)
    net.trunk = faster_trunk(net.model.vision_encoder.backbone)
    return net
