"""SAM 2 and SAM 2.1 (Meta's sam2, from the rf-sam-2 wheel): the hiera tiny, small, base_plus and
large models of both, and the test architecture test_sam2.1_hiera.

The family contract (models/family.py, which the type checker holds this package to): `build`,
`save_checkpoint`, `prepare`, `embedding_layout` and `engine`. Nothing here needs sam2's compiled
`_C` extension: its connected components (hole filling) are components.py's.
"""

from __future__ import annotations

from sam_fast_serve.models.sam2.build import build, save_checkpoint
from sam_fast_serve.models.sam2.build import prepare_model as prepare
from sam_fast_serve.models.sam2.engine import engine
from sam_fast_serve.models.sam2.predictor import embedding_layout

__all__ = ["build", "embedding_layout", "engine", "prepare", "save_checkpoint"]
