"""A worker's device on a multi-GPU host, without a GPU: dtype auto by the worker's GPU's own compute
capability, the GPU made current once, stage timing on the device's clock without a device-wide
synchronize, and the device tests run on (harness.devices)."""

from __future__ import annotations

import time

import pytest
import torch

from harness import devices
from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models import precision
from sam_fast_serve.models.timing import StageClock

CUDA0, CUDA1 = torch.device("cuda:0"), torch.device("cuda:1")


# The compute capability of GPUs a worker meets, and those that compute bf16 natively.
GPUS = {"P4": (6, 1), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "L4": (8, 9), "H100": (9, 0), "B200": (10, 0)}
NATIVE_BF16 = {"A100", "L4", "H100", "B200"}


@pytest.mark.parametrize("gpu", GPUS)
def test_bf16_is_native_from_ampere_on(gpu):
    assert precision.gpu_has_native_bf16(GPUS[gpu]) is (gpu in NATIVE_BF16)


@pytest.fixture
def t4_and_a100(monkeypatch):
    """A host whose GPU 0 is a T4 and GPU 1 an A100: the capability asked for is the device's own."""
    capabilities = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[device.index])


def test_auto_is_bf16_only_on_the_worker_gpu_that_computes_it(t4_and_a100):
    assert precision.resolve_dtype("auto", CUDA1) == torch.bfloat16
    assert precision.resolve_dtype("auto", CUDA0) == torch.float32
    assert precision.resolve_dtype("float32", CUDA1) == torch.float32


def test_bfloat16_on_a_gpu_that_emulates_it_is_served_with_a_warning(t4_and_a100, caplog):
    with caplog.at_level("WARNING", logger=precision.__name__):
        assert precision.resolve_precision("bfloat16", CUDA0) == precision.Precision(torch.bfloat16)
    assert "without native bf16 (compute capability 7.5, below 8.0)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=precision.__name__):
        precision.resolve_precision("bfloat16", CUDA1)
    assert not caplog.text


@pytest.fixture
def two_gpus(monkeypatch):
    """A host with two CUDA devices; torch.cuda.set_device records the devices it is given."""
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    return made_current


def test_the_worker_gets_the_gpu_torchserve_gave_it_and_makes_it_current(two_gpus):
    assert precision.select_device(1) == CUDA1
    assert precision.select_device(None) == torch.device("cpu")
    precision.use_device(CUDA1)
    precision.use_device(torch.device("cpu"))
    assert two_gpus == [CUDA1]


def test_a_gpu_torch_does_not_see_is_a_config_error(two_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError, match=r"GPU 2, and torch sees 2 \(CUDA_VISIBLE_DEVICES 2,3\)"):
        precision.select_device(2)


def test_without_cuda_every_worker_is_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.select_device(0) == torch.device("cpu")


def test_the_clock_adds_a_stages_wall_seconds_on_the_cpu():
    clock = StageClock(torch.device("cpu"))
    for _ in range(2):
        with clock.stage("mask_decoder"):
            time.sleep(0.02)
    with clock.stage("image_encoder"):
        pass
    seconds = clock.take()
    assert seconds.keys() == {"mask_decoder", "image_encoder"}
    assert 0.04 <= seconds["mask_decoder"] < 0.5 and seconds["image_encoder"] < seconds["mask_decoder"]
    assert clock.take() == {}


class FakeEvent:
    """A CUDA event on a fake device clock (`now`, seconds): where the stream reached it."""

    now = 0.0
    synchronized = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self, stream: object) -> None:
        assert stream == ("stream of", CUDA1)
        self.at = FakeEvent.now

    def synchronize(self) -> None:
        FakeEvent.synchronized += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return (end.at - self.at) * 1000


def test_the_clock_times_a_gpu_stage_on_its_stream_without_waiting_for_the_device(monkeypatch):
    def no_synchronize(device=None):
        raise AssertionError("a device-wide synchronize in a stage")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch.cuda, "synchronize", no_synchronize)
    monkeypatch.setattr(FakeEvent, "now", 0.0)
    monkeypatch.setattr(FakeEvent, "synchronized", 0)
    clock = StageClock(CUDA1)
    with clock.stage("image_encoder"):
        FakeEvent.now += 2.0
    FakeEvent.now += 0.5  # between stages: left to postprocess
    for _ in range(2):
        with clock.stage("mask_decoder"):
            FakeEvent.now += 1.5
    assert FakeEvent.synchronized == 0  # the host never waited while the stages ran
    assert clock.take() == {"image_encoder": 2.0, "mask_decoder": 3.0}
    assert FakeEvent.synchronized > 0 and clock.take() == {}


def test_the_tests_device_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(devices.TEST_DEVICE_ENV, raising=False)
    assert devices.device_under_test() == torch.device("cpu")
    assert devices.gpu_id(torch.device("cpu")) is None
    assert devices.gpu_id(torch.device("cuda")) == 0 and devices.gpu_id(CUDA1) == 1
    missing = f"cuda:{torch.cuda.device_count()}"  # one past this machine's GPUs
    monkeypatch.setenv(devices.TEST_DEVICE_ENV, missing)
    with pytest.raises(ValueError, match="CUDA device"):
        devices.device_under_test()
    with pytest.raises(ValueError, match="cpu or cuda"):
        devices.checked_device("mps")
