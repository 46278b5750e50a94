"""Seconds spent per stage of the engine, accumulated where the work is done and read per image.

Imports no torch until a CUDA stage ends: the metrics table (server.metrics) reads ENGINE_STAGES.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The stages an engine times, in order; each answered image reports every one (0 when skipped, e.g.
# the encoder on a cached embedding). postprocess is what the others leave of the engine's time.
ENGINE_STAGES = ("embedding_store", "image_encoder", "mask_decoder", "postprocess")


class StageClock:
    """Wall seconds per stage name since the last `take`. On CUDA a stage ends with a synchronize,
    so that the kernels it queued are charged to it and not to the next stage."""

    def __init__(self, device: torch.device) -> None:
        self.synchronize = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                import torch

                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds gathered since the last call, and start again from zero."""
        seconds, self.seconds = self.seconds, {}
        return seconds
