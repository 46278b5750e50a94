"""Seconds spent per stage of the engine, accumulated where the work is done and read per image."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds gathered since the last call, and start again from zero."""
        seconds, self.seconds = self.seconds, {}
        return seconds
