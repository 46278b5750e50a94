"""The SAM 2 engine: Sam2Predictor and Sam2AutomaticMaskGenerator behind models.engine.Engine."""

from __future__ import annotations

import torch
from sam2.modeling.sam2_base import SAM2Base

from sam_fast_serve.common.options import AmgSettings
from sam_fast_serve.models.embedding import EmbeddingStore
from sam_fast_serve.models.engine import Engine, warm_up_image, warm_up_settings
from sam_fast_serve.models.registry import SAM2, ModelType
from sam_fast_serve.models.sam2.automatic import Sam2AutomaticMaskGenerator
from sam_fast_serve.models.sam2.predictor import Sam2Predictor
from sam_fast_serve.models.sam2.tracker import Sam2Tracker, video_predictor


def engine(
    model: ModelType, net: SAM2Base, dtype: torch.dtype, store: EmbeddingStore, process_batch_size: int
) -> Engine:
    """An Engine over a prepared SAM 2 model: Sam2Predictor (encoder in `dtype`, `store`) and
    Sam2AutomaticMaskGenerator, `process_batch_size` images per encoder call; Sam2Tracker for video,
    holding the same weights."""
    predictor = Sam2Predictor(net, dtype, store)

    def generator(settings: AmgSettings, predictor: Sam2Predictor = predictor) -> Sam2AutomaticMaskGenerator:
        return Sam2AutomaticMaskGenerator(
            net,
            **settings.generator_arguments(SAM2.amg_keys),
            output_mode="coco_rle",
            process_batch_size=process_batch_size,
            predictor=predictor,
        )

    def warm_up() -> None:
        # A predictor of its own sharing the decoder, which keeps nothing (see the SAM 1 engine).
        generator(warm_up_settings(SAM2), Sam2Predictor(net, dtype, decoder=predictor.decoder)).generate(
            warm_up_image()
        )

    def tracker() -> Sam2Tracker:
        return Sam2Tracker(video_predictor(model, net), dtype)

    return Engine(model, dtype, predictor, generator, warm_up, tracker)
