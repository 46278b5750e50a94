"""SAM 1 (segment_anything): vit_b, vit_l, vit_h, and the test architecture test_vit.

The family contract (models/family.py, which the type checker holds this package to): `build`,
`save_checkpoint`, `prepare`, `embedding_layout` and `engine`.
"""

from __future__ import annotations

from sam_fast_serve.models.sam1.build import build, save_checkpoint
from sam_fast_serve.models.sam1.build import prepare_model as prepare
from sam_fast_serve.models.sam1.engine import embedding_layout, engine

__all__ = ["build", "embedding_layout", "engine", "prepare", "save_checkpoint"]
