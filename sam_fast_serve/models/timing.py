"""Seconds spent per stage of the engine, accumulated where the work is done and read per image.

Imports no torch until a CUDA stage starts: the metrics table (server.metrics) reads ENGINE_STAGES.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The stages an engine times, in order; each answered image reports every one (0 when skipped, e.g.
# the encoder on a cached embedding). postprocess is what the others leave of the engine's time.
ENGINE_STAGES = ("embedding_store", "image_encoder", "mask_decoder", "postprocess")


class StageClock:
    """Seconds per stage name since the last `take`, on `device`'s own clock.

    On the CPU a stage's seconds are its wall seconds. On CUDA they are the span between two events
    recorded on the device's current stream as the stage starts and ends: the kernels the stage
    queued are charged to it, not to the stage that next waits for them, and the host never waits
    for the device at a stage's end (a synchronize there would leave the GPU idle while the host
    queues the next stage). The device's clock is read in `take`, once the work is done.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # (stage, start mark, end mark): perf_counter seconds on the CPU, CUDA events on a GPU.
        self._spans: list[tuple[str, Any, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self._spans.append((name, start, self._mark()))

    def take(self) -> dict[str, float]:
        """The seconds gathered since the last call, by stage, and start again from zero. On CUDA
        it waits for the stages' work to finish (an answered image has waited for it already)."""
        spans, self._spans = self._spans, []
        seconds: dict[str, float] = {}
        for name, start, end in spans:
            seconds[name] = seconds.get(name, 0.0) + self._seconds(start, end)
        return seconds

    def _mark(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _seconds(self, start: Any, end: Any) -> float:
        if self.device.type != "cuda":
            return float(end - start)
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000  # milliseconds
