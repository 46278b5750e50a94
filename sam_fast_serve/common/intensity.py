"""Image samples to the 8-bit RGB SAM sees: which channels, and how intensities map to 8 bits.
Needs only numpy: the server's decoder and the client's overlays share it, so both show an image the
same way.

Modes (the `intensity` key and request option):
    linear      the dtype's full range (uint16: 65535 -> 255; float: [0, 1]); uint8 as it is
    minmax      each channel's lowest..highest finite sample
    percentile  each channel's low..high percentile of its finite samples
    auto        uint8 untouched, anything wider or float by percentile
NaN and infinite samples are left out of the statistics and become 0; a channel with one value
(a constant image) becomes 0 in the stretching modes, not a division by zero.
"""

from __future__ import annotations

import numpy as np

from sam_fast_serve.common.errors import InvalidOption

INTENSITY_MODES = ("auto", "linear", "minmax", "percentile")
# CSBDeep's and StarDist's normalisation defaults (percentiles 1 and 99.8), the ones microscopy users know.
DEFAULT_PERCENTILES = (1.0, 99.8)


def linear_16_to_8(samples: np.ndarray) -> np.ndarray:
    """16-bit samples to uint8 over the dtype's full range (65535 -> 255, rounded), so relative
    brightness is kept."""
    return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _scaled(samples: np.ndarray, low: float, high: float) -> np.ndarray:
    """`samples` with low -> 0 and high -> 255, clipped and rounded; non-finite samples and a
    range of zero width give 0."""
    values = samples.astype(np.float32)
    if not high > low:
        return np.zeros(samples.shape, np.uint8)
    values -= np.float32(low)
    values *= np.float32(255.0 / (high - low))
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(values, 0.0, 255.0, out=values)
    values += 0.5
    return values.astype(np.uint8)


def _linear(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.uint8:
        return samples
    if samples.dtype == np.uint16:
        return linear_16_to_8(samples)
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        return _scaled(samples, float(info.min), float(info.max))
    return _scaled(samples, 0.0, 1.0)


def _limits(channel: np.ndarray, mode: str, percentiles: tuple[float, float]) -> tuple[float, float]:
    finite = channel[np.isfinite(channel)] if np.issubdtype(channel.dtype, np.floating) else channel.ravel()
    if finite.size == 0:
        return 0.0, 0.0
    if mode == "minmax":
        return float(finite.min()), float(finite.max())
    low, high = np.percentile(finite, percentiles)
    return float(low), float(high)


def to_uint8(samples: np.ndarray, mode: str, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """(H, W, C) samples of an integer or float dtype as uint8 (H, W, C), by `mode` (one of
    INTENSITY_MODES); `percentiles` (low, high) in 0..100 for "percentile"."""
    if mode == "auto":
        mode = "linear" if samples.dtype == np.uint8 else "percentile"
    if mode == "linear":
        return _linear(samples)
    channels = [
        _scaled(samples[..., c], *_limits(samples[..., c], mode, percentiles)) for c in range(samples.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def choose_channels(samples: np.ndarray, chosen: tuple[int, ...] | None) -> np.ndarray:
    """The one or three channels of (H, W, C) `samples` that SAM sees: `chosen`, or by default gray
    as gray, RGB and RGBA as RGB (alpha dropped), any other count its first channel as gray.
    Raises InvalidOption naming the channel count when a chosen channel does not exist."""
    count = samples.shape[2]
    if chosen is None:
        chosen = (0, 1, 2) if count in (3, 4) else (0,)
    missing = [c for c in chosen if c >= count]
    if missing:
        raise InvalidOption(f"channel(s) {missing} do not exist: the image has {count} channel(s), 0 to {count - 1}")
    return samples[:, :, list(chosen)]


def rgb_for_sam(
    samples: np.ndarray,
    channels: tuple[int, ...] | None = None,
    mode: str = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """(H, W, C) samples as the contiguous uint8 RGB (H, W, 3) that SAM sees: `channels` chosen,
    mapped by `mode`, one channel shown as gray."""
    image = to_uint8(choose_channels(samples, channels), mode, percentiles)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)
