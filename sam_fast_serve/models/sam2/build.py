"""Building SAM 2 and SAM 2.1 models with sam2's own Hydra configs, and preparing them to serve.

Checkpoints are in the official form, {"model": state_dict}, read with weights_only=True. The
image encoder computes in the engine's dtype under autocast: sam2's forward_image applies the mask
decoder's high-resolution convolutions to the backbone's features, so casting the encoder alone
would mix dtypes, and autocast keeps the norms and softmax in float32 where torch deems it needed.
Only the Hiera trunk holds its weights in that dtype (trunk.py): its residual stream would
otherwise stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sam2.build_sam import build_sam2, build_sam2_video_predictor
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_video_predictor import SAM2VideoPredictor

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.checkpoints import load_fitting
from sam_fast_serve.models.precision import Precision
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.sam2.attention import faster_hiera
from sam_fast_serve.models.sam2.neck import fold_high_res
from sam_fast_serve.models.sam2.positions import cached_positions
from sam_fast_serve.models.sam2.trunk import served_trunk, trunk_in

# The test architecture: hiera_tiny's config with a 16-channel trunk of 5 blocks (one global) and
# one memory attention layer, so every code path runs at a small fraction of the FLOPs.
TEST_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.memory_attention.num_layers=1",
)
# Video tracking in the test architecture also runs at 256 x 256 (35x faster a frame than 1024):
# the video predictor reads the model's size, where SAM2ImagePredictor, the image path's
# reference, assumes 1024. The weights are the same.
VIDEO_TEST_OVERRIDES = (*TEST_OVERRIDES, "++model.image_size=256")


def build(model: ModelType, checkpoint: str | None = None) -> SAM2Base:
    """Build `model` on the CPU in eval mode, with SAM 2's image post-processing settings (those of
    sam2.build_sam.build_sam2); load `checkpoint` ({"model": state_dict}) with weights_only=True if
    given, else keep random weights. Raises ConfigError when the checkpoint is not one of `model`."""
    overrides = list(TEST_OVERRIDES) if model.test_only else []
    net = build_sam2(model.build, None, device="cpu", hydra_overrides_extra=overrides)
    if checkpoint is not None:
        _load(net, checkpoint, model)
    return net.eval()


def _load(net: SAM2Base, checkpoint: str, model: ModelType) -> None:
    """Load an official checkpoint ({"model": state_dict}) into `net` (ConfigError if it is not one of `model`)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"{checkpoint}: not a SAM 2 checkpoint (a dict with the state dict under 'model')")
    load_fitting(net, state["model"], checkpoint, model.name)


def build_video(model: ModelType, checkpoint: str | None = None) -> SAM2VideoPredictor:
    """`model` as SAM 2's video predictor (sam2.build_sam.build_sam2_video_predictor's settings),
    on the CPU in eval mode, `checkpoint` loaded as by `build`."""
    overrides = list(VIDEO_TEST_OVERRIDES) if model.test_only else []
    predictor = build_sam2_video_predictor(model.build, None, device="cpu", hydra_overrides_extra=overrides)
    if checkpoint is not None:
        _load(predictor, checkpoint, model)
    predictor.memory_attention.register_forward_pre_hook(_memory_in_frame_dtype, with_kwargs=True)
    return predictor.eval()


def _memory_in_frame_dtype(
    _: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """SAM 2 stores its memory bank in bf16 and computes with it under autocast (its CUDA path);
    without autocast, as on a CPU in fp32, the memory enters attention in the current frame's dtype."""
    current = kwargs["curr"]
    dtype = (current[0] if isinstance(current, list) else current).dtype
    for key in ("memory", "memory_pos"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key].to(dtype)
    return args, kwargs


def save_checkpoint(net: SAM2Base, path: Path) -> None:
    """Write `net` as an official SAM 2 checkpoint file: {"model": its state dict}."""
    torch.save({"model": net.state_dict()}, path)


def faster_encoders(net: SAM2Base) -> None:
    """`net`'s Hiera attention computed where it pays (attention.py), its position encodings
    served from their cache (positions.py, trunk.py), its high-resolution features by one
    convolution each (neck.py): the same values, sooner."""
    faster_hiera(net)
    cached_positions(net)
    served_trunk(net)
    fold_high_res(net)


def prepare_model(net: SAM2Base, device: torch.device, precision: Precision, compile_encoder: bool = False) -> SAM2Base:
    """Move `net` to `device`, its encoders made faster (`faster_encoders`), its trunk's weights
    in the precision's dtype. The dtype is applied at encoding time (autocast, see above); int8 and
    compile are SAM 1's (the config refuses them here: models.registry.Family)."""
    assert not precision.int8 and not compile_encoder, "SAM 2 has no int8 encoder and no compiled one"
    faster_encoders(net)
    if precision.dtype != torch.float32:
        trunk_in(net, precision.dtype)
    return net.to(device).eval()
