"""Model loading and warm-up: a validated config and a model directory in, ready Engines out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .build import prepare_model, resolve_dtype, sam_model_fast_registry, select_device
from .checkpoints import resolve_checkpoint
from .config import ServiceConfig
from .engines import Engines

logger = logging.getLogger(__name__)


def load_engines(config: ServiceConfig, model_dir: Path, gpu_id: int | None) -> Engines:
    """Check the checkpoint, build the model on the right device and dtype, and warm it up.

    Raises ConfigError naming the checkpoint file when it is missing or fails its hash check.
    """
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(model_dir, config.checkpoint_file, config.model_type)
    device = select_device(gpu_id)
    dtype = resolve_dtype(config.dtype, device)
    sam = sam_model_fast_registry[config.model_type](str(checkpoint))
    engines = Engines(config, prepare_model(sam, device, dtype, compile_encoder=config.compile), dtype)
    loaded = time.perf_counter()
    engines.warm_up()
    logger.info(
        "loaded %s from %s on %s in %s in %.1f s, warmed up in %.1f s",
        config.model_type,
        config.checkpoint_file,
        device,
        dtype,
        loaded - started,
        time.perf_counter() - loaded,
    )
    return engines
