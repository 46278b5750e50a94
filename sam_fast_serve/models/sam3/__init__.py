"""SAM 3 (Meta, November 2025) through Hugging Face transformers' Sam3VideoModel: concept requests
(a phrase, exemplar boxes, or both: every instance) through its detector, and point, box and mask
prompts through its tracker, from the published checkpoint folder; and the test architecture
test_sam3.

The family contract (models/family.py, which the type checker holds this package to): `build`,
`save_checkpoint`, `prepare`, `embedding_layout` and `engine`.
"""

from __future__ import annotations

from sam_fast_serve.models.sam3.build import build, prepare, save_checkpoint
from sam_fast_serve.models.sam3.engine import engine
from sam_fast_serve.models.sam3.predictor import embedding_layout

__all__ = ["build", "embedding_layout", "engine", "prepare", "save_checkpoint"]
