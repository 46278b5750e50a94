"""The SAM 3 engine: the predictor of concepts and prompts behind models.engine.Engine (no
automatic mask generation, no video: the service refuses them for this family)."""

from __future__ import annotations

import numpy as np
import torch

from sam_fast_serve.common.concepts import Concepts
from sam_fast_serve.common.prompts import Prompts
from sam_fast_serve.models.embedding import EmbeddingStore
from sam_fast_serve.models.engine import Engine, warm_up_image
from sam_fast_serve.models.registry import ModelType, model_types_that
from sam_fast_serve.models.sam3.build import Sam3Net
from sam_fast_serve.models.sam3.predictor import Sam3Predictor

# What the warm-up asks: two phrases with an exemplar box (the geometry encoder's pooling too), every
# query kept (threshold 0), so that every stage runs at the shapes a request has, masks included;
# and, with the tracker, a box with a point.
WARM_UP_CONCEPTS = Concepts(
    ("warm", "up"), np.array([[64.0, 64.0, 320.0, 320.0]]), np.array([1]), threshold=0.0, max_instances=4
)
WARM_UP_PROMPTS = Prompts(
    np.array([[128.0, 128.0]]), np.array([1]), np.array([[64.0, 64.0, 320.0, 320.0]]), True, False
)


def engine(
    model: ModelType, net: Sam3Net, dtype: torch.dtype, store: EmbeddingStore, process_batch_size: int
) -> Engine:
    """An Engine over a prepared SAM 3 model: Sam3Predictor (in `dtype`, `store`). A checkpoint
    without the tracker (a detector saved alone) answers concepts only."""
    predictor = Sam3Predictor(net, dtype, store)

    def warm_up() -> None:
        # A predictor of its own, which keeps nothing in the store (see the SAM 1 engine).
        own = Sam3Predictor(net, dtype)
        own.set_image(warm_up_image())
        own.segment_concepts(WARM_UP_CONCEPTS, 2 * 4)
        if own.tracker is not None:
            own.segment_prompts(WARM_UP_PROMPTS)

    unserved = {}
    if net.video is None:
        unserved["prompted"] = (
            f"this {model.name} checkpoint is SAM 3's detector alone (a folder saved from Sam3Model): it has no "
            "tracker weights for point, box or mask prompts; serve the published folder (facebook/sam3, whose "
            f"config.json says sam3_video), or {model_types_that(lambda f: f.prompts and f is not model.family)}"
        )
    return Engine(model, dtype, predictor, None, warm_up, unserved=unserved)
