"""SAM 1 (segment_anything): vit_b, vit_l, vit_h, and the test architecture test_vit.

The family contract (models/family.py, which the type checker holds this package to): `build`,
`checkpoint_state`, `prepare`, `embedding_layout` and `engine`.
"""

from __future__ import annotations

from sam_fast_serve.models.sam1.build import build, checkpoint_state
from sam_fast_serve.models.sam1.build import prepare_model as prepare
from sam_fast_serve.models.sam1.engine import embedding_layout, engine

__all__ = ["build", "checkpoint_state", "embedding_layout", "engine", "prepare"]
