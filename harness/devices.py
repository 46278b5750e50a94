"""The device tests and benchmarks load models on, and the gpu_id TorchServe would give a worker there."""

from __future__ import annotations

import os

import torch

# `SAM_FAST_TEST_DEVICE=cuda:0 make test` runs the equivalence, prompt, store and video tests on a GPU.
TEST_DEVICE_ENV = "SAM_FAST_TEST_DEVICE"


def checked_device(name: str) -> torch.device:
    """The torch device `name` ("cpu", "cuda", "cuda:1"); ValueError for a GPU this machine lacks,
    rather than a run that quietly falls back to the CPU."""
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: a device is cpu or cuda[:index]")
    index = gpu_id(device)
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"{name}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    return device


def device_under_test() -> torch.device:
    """The device of $SAM_FAST_TEST_DEVICE, the CPU where it is unset (checked_device's errors)."""
    return checked_device(os.environ.get(TEST_DEVICE_ENV, "cpu"))


def gpu_id(device: torch.device) -> int | None:
    """The gpu_id a worker on `device` is given (MaskService.load's): the GPU's index ("cuda" is
    GPU 0), None on the CPU."""
    if device.type != "cuda":
        return None
    return 0 if device.index is None else device.index
