"""Model loading and warm-up: a validated config and a model directory in, ready Engines out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from segment_anything.modeling import Sam

from .build import Precision, prepare_model, resolve_precision, sam_model_fast_registry, select_device
from .checkpoints import checkpoint_sha256, resolve_checkpoint
from .config import ServiceConfig
from .embeddings import EmbeddingCache
from .engines import Engines
from .store import EmbeddingStore, ModelIdentity, RedisEmbeddings

logger = logging.getLogger(__name__)


def load_engines(config: ServiceConfig, model_dir: Path, gpu_id: int | None) -> Engines:
    """Check the checkpoint, build the model on the right device and dtype, and warm it up.

    Raises ConfigError naming the checkpoint file when it is missing or fails its hash check.
    """
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(model_dir, config.checkpoint_file, config.model_type)
    device = select_device(gpu_id)
    precision = resolve_precision(config.dtype, device)
    sam = sam_model_fast_registry[config.model_type](str(checkpoint))
    sam = prepare_model(sam, device, precision, compile_encoder=config.compile)
    engines = Engines(config, sam, precision.dtype, _embedding_store(config, checkpoint, sam, precision))
    loaded = time.perf_counter()
    engines.warm_up()
    logger.info(
        "loaded %s from %s on %s in %s in %.1f s, warmed up in %.1f s",
        config.model_type,
        config.checkpoint_file,
        device,
        precision.name,
        loaded - started,
        time.perf_counter() - loaded,
    )
    return engines


def _embedding_store(config: ServiceConfig, checkpoint: Path, sam: Sam, precision: Precision) -> EmbeddingStore:
    """The worker's LRU, behind it the shared Redis store when the config names one."""
    local = EmbeddingCache(config.embedding_cache_bytes)
    if config.embedding_store == "memory":
        return EmbeddingStore(local)
    quantization = precision.name if precision.int8 else None
    identity = ModelIdentity(config.model_type, checkpoint_sha256(checkpoint), precision.dtype, quantization)
    prompt_encoder = sam.prompt_encoder  # the decoder's view of an embedding: (C, H, W)
    channels_shape = (prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)
    shared = RedisEmbeddings(config.embedding_store, identity, channels_shape, config.embedding_ttl_s)
    return EmbeddingStore(local, shared)
