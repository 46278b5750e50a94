"""Connected components by scipy, in the form SAM 2's `_C` kernel answers them: the independent
computation tests hold `sam_fast_serve.models.sam2.components` and SAM 2's own hole filling to."""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.ndimage as ndi
import torch

from sam_fast_serve.models.sam2.components import labelling_sam2s_own

EIGHT = np.ones((3, 3), dtype=bool)


def reference_components(mask: np.ndarray, structure: np.ndarray = EIGHT) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, H, W) bool -> (labels, counts) by the kernel's rule, computed with scipy one pixel at a time:
    label = 1 + the smallest 2x2-block corner index over the component, count = component area."""
    n, _, height, width = mask.shape
    rows, cols = np.indices((height, width))
    corner = (rows - rows % 2) * width + (cols - cols % 2)
    labels = np.zeros(mask.shape, dtype=np.int64)
    counts = np.zeros(mask.shape, dtype=np.int64)
    for i in range(n):
        lab, k = ndi.label(mask[i, 0], structure=structure)
        if k == 0:
            continue
        index = np.arange(1, k + 1)
        first = np.asarray(ndi.minimum(corner, lab, index=index), dtype=np.int64)
        area = np.bincount(lab.ravel(), minlength=k + 1)
        fg = lab > 0
        labels[i, 0][fg] = first[lab[fg] - 1] + 1
        counts[i, 0][fg] = area[lab[fg]]
    return labels, counts


def _scipy_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels, counts = reference_components(mask.cpu().numpy().astype(bool))
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def sam2_labelled_by_scipy() -> contextlib.AbstractContextManager[None]:
    """A context in which SAM 2's post-processing labels with scipy: SAM 2 as it behaves with its `_C`
    extension built."""
    return labelling_sam2s_own(_scipy_components)
