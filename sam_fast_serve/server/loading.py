"""Model loading and warm-up: a validated config and a model directory in, a ready Engine out.

The config's `model_type` picks the family (models.registry); the family builds and prepares the
model and makes its engine; this module does what is the same for every family: the checkpoint's
checks, the device (made current) and precision, the embedding store, the warm-up and its log line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sam_fast_serve.models.checkpoints import checkpoint_sha256, resolve_checkpoint
from sam_fast_serve.models.embedding import EmbeddingCache, EmbeddingStore
from sam_fast_serve.models.engine import Engine
from sam_fast_serve.models.precision import Precision, resolve_precision, select_device, use_device
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.server.config import ServiceConfig
from sam_fast_serve.server.store import ModelIdentity, RedisEmbeddings

logger = logging.getLogger(__name__)


def load_engine(config: ServiceConfig, model_dir: Path, gpu_id: int | None) -> Engine:
    """Check the checkpoint, build the model on the right device and precision, and warm it up.

    On a GPU (`gpu_id`, TorchServe's) that GPU becomes the process's current device. Raises
    ConfigError naming the checkpoint file when it is missing or fails its hash check, the key
    whose value this worker cannot serve, or a GPU torch does not see.
    """
    started = time.perf_counter()
    model = model_type(config.model_type)
    family = model.family.code()
    checkpoint = resolve_checkpoint(model_dir, config.checkpoint_file, config.model_type)
    device = select_device(gpu_id)
    use_device(device)
    precision = resolve_precision(config.dtype, device)
    net = family.prepare(family.build(model, str(checkpoint)), device, precision, compile_encoder=config.compile)
    store = _embedding_store(config, checkpoint, precision, family.embedding_layout(net))
    engine: Engine = family.engine(model, net, precision.dtype, store, config.process_batch_size)
    loaded = time.perf_counter()
    engine.warm_up()
    logger.info(
        "loaded %s from %s on %s in %s in %.1f s, warmed up in %.1f s",
        config.model_type,
        config.checkpoint_file,
        device,
        precision.name,
        loaded - started,
        time.perf_counter() - loaded,
    )
    return engine


def _embedding_store(
    config: ServiceConfig, checkpoint: Path, precision: Precision, layout: dict[str, tuple[int, ...]]
) -> EmbeddingStore:
    """The worker's LRU, behind it the shared Redis store when the config names one."""
    local = EmbeddingCache(config.embedding_cache_bytes)
    if config.embedding_store == "memory":
        return EmbeddingStore(local)
    quantization = precision.name if precision.int8 else None
    files = model_type(config.model_type).family.checkpoint_files
    identity = ModelIdentity(config.model_type, checkpoint_sha256(checkpoint, files), precision.dtype, quantization)
    return EmbeddingStore(local, RedisEmbeddings(config.embedding_store, identity, layout, config.embedding_ttl_s))
