"""The benchmarks' kept shares: thresholds a request accepts, keeping the share asked for."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.shares import pairs_kept, share_settings
from sam_fast_serve.common.options import AmgSettings, apply_request_options

SAM1_KEYS = ("pred_iou_thresh", "stability_score_thresh")


@pytest.mark.parametrize(
    "ious",
    [np.linspace(0.05, 0.6, 300), np.linspace(-0.9, -0.2, 300), np.linspace(-0.3, 0.4, 300)],
    ids=["positive", "negative", "both"],
)
@pytest.mark.parametrize("share", [0.0, 1.0])
def test_share_is_kept_by_a_valid_request(ious: np.ndarray, share: float) -> None:
    settings = share_settings(ious, share)
    assert pairs_kept(ious, settings) == share
    # The thresholds go to the server as request options: they must pass its checks.
    applied = apply_request_options(AmgSettings(), settings, SAM1_KEYS, "vit_b")
    assert applied.pred_iou_thresh == settings["pred_iou_thresh"]


def test_a_quantile_share_keeps_about_that_share() -> None:
    ious = np.linspace(0.05, 0.6, 1000)
    settings = share_settings(ious, 0.3)
    assert pairs_kept(ious, settings) == pytest.approx(0.3, abs=0.002)


def test_a_quantile_at_or_below_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="would not filter"):
        share_settings(np.linspace(-0.9, -0.2, 300), 0.3)
