"""Mapping image samples to the 8 bits SAM sees. Needs only numpy: the server's decoder and the
client's overlays share it, so both show an image the same way."""

from __future__ import annotations

import numpy as np


def linear_16_to_8(samples: np.ndarray) -> np.ndarray:
    """16-bit samples to uint8 over the dtype's full range (65535 -> 255, rounded), so relative
    brightness is kept."""
    return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)
