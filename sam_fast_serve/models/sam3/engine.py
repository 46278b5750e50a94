"""The SAM 3 engine: the concept predictor behind models.engine.Engine (no automatic mask
generation, no point or box prompts, no video: the service refuses them for this family)."""

from __future__ import annotations

import numpy as np
import torch

from sam_fast_serve.common.concepts import Concepts
from sam_fast_serve.models.embedding import EmbeddingStore
from sam_fast_serve.models.engine import Engine, warm_up_image
from sam_fast_serve.models.registry import ModelType
from sam_fast_serve.models.sam3.build import Sam3Net
from sam_fast_serve.models.sam3.concepts import ConceptPredictor

# What the warm-up asks: two phrases with an exemplar box (the geometry encoder's pooling too), every
# query kept (threshold 0), so that every stage runs at the shapes a request has, masks included.
WARM_UP_CONCEPTS = Concepts(
    ("warm", "up"), np.array([[64.0, 64.0, 320.0, 320.0]]), np.array([1]), threshold=0.0, max_instances=4
)


def engine(
    model: ModelType, net: Sam3Net, dtype: torch.dtype, store: EmbeddingStore, process_batch_size: int
) -> Engine:
    """An Engine over a prepared SAM 3 model: ConceptPredictor (in `dtype`, `store`)."""
    predictor = ConceptPredictor(net, dtype, store)

    def warm_up() -> None:
        # A predictor of its own, which keeps nothing in the store (see the SAM 1 engine).
        own = ConceptPredictor(net, dtype)
        own.set_image(warm_up_image())
        own.segment_concepts(WARM_UP_CONCEPTS, 2 * 4)

    return Engine(model, dtype, predictor, None, warm_up)
