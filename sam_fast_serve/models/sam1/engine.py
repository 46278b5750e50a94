"""The SAM 1 engine: the fast predictor and generator behind models.engine.Engine."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from sam_fast_serve.common.options import AmgSettings
from sam_fast_serve.models.embedding import EmbeddingStore
from sam_fast_serve.models.engine import Engine, warm_up_image, warm_up_settings
from sam_fast_serve.models.fast_decoder import FastMaskDecoder
from sam_fast_serve.models.registry import SAM1, ModelType
from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
from sam_fast_serve.models.sam1.predictor import FastSamPredictor


def embedding_layout(sam: Sam) -> dict[str, tuple[int, ...]]:
    """The tensors of one SAM 1 embedding: the image encoder's output, (1, C, 64, 64)."""
    prompt_encoder = sam.prompt_encoder
    return {"features": (1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)}


def engine(model: ModelType, sam: Sam, dtype: torch.dtype, store: EmbeddingStore, process_batch_size: int) -> Engine:
    """An Engine over a prepared SAM 1 model: FastSamPredictor (fast decoder in `dtype`, `store`)
    and SamAutomaticMaskGenerator, `process_batch_size` images per encoder call."""
    predictor = FastSamPredictor(sam, FastMaskDecoder(sam.mask_decoder, dtype), store)

    def generator(settings: AmgSettings, predictor: FastSamPredictor = predictor) -> SamAutomaticMaskGenerator:
        return SamAutomaticMaskGenerator(
            sam,
            **settings.generator_arguments(SAM1.amg_keys),
            output_mode="coco_rle",
            process_batch_size=process_batch_size,
            predictor=predictor,
        )

    def warm_up() -> None:
        # Its predictor shares the decoder but keeps nothing: the warm-up image has no place in the
        # embedding store, and a shared store that is down must not slow or log a worker's start.
        generator(warm_up_settings(SAM1), FastSamPredictor(sam, predictor.decoder)).generate(warm_up_image())

    return Engine(model, dtype, predictor, generator, warm_up)
