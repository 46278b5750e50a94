"""The family contract: what the package of every model family (models/<family>/) provides, as a
Protocol the type checker holds each package to (models/registry.py binds each family to its
package). The server and the tools reach a family's code only through it.

Torch free at run time: the types below are for the checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import torch

    from sam_fast_serve.models.embedding import EmbeddingStore
    from sam_fast_serve.models.engine import Engine
    from sam_fast_serve.models.precision import Precision
    from sam_fast_serve.models.registry import ModelType

# The family's network, as its upstream code builds it (segment_anything's Sam, sam2's SAM2Base, ...).
Net = TypeVar("Net")


class FamilyCode(Protocol[Net]):
    """A model family's package: build its network, prepare it for serving, and make the engine."""

    def build(self, model: ModelType, checkpoint: str | None = None) -> Net:
        """The network of `model` in eval mode, on the CPU, in float32, with the weights of
        `checkpoint` (a file loaded with weights_only=True, or safetensors in a folder), or random
        ones when it is None. Raises ConfigError when the checkpoint is not one of this model type."""
        ...

    def save_checkpoint(self, net: Net, path: Path) -> None:
        """Write `net` at `path` in the family's official checkpoint form (a file, or a folder)."""
        ...

    def prepare(self, net: Net, device: torch.device, precision: Precision, compile_encoder: bool = False) -> Net:
        """`net` moved to `device` and made to compute in `precision` (compiled where asked)."""
        ...

    def embedding_layout(self, net: Net) -> dict[str, tuple[int, ...]]:
        """The tensors one image's embedding holds, by name and shape: the shared store checks every
        entry against it."""
        ...

    def engine(
        self, model: ModelType, net: Net, dtype: torch.dtype, store: EmbeddingStore, process_batch_size: int
    ) -> Engine:
        """The engine the service talks to over the prepared `net`."""
        ...
