"""models.budget: how many items a step takes at once, from the worker's bound, the CPU's speed size and
a CUDA device's free memory (its calls stood in for here); and the handler key that sets the bound."""

from __future__ import annotations

import pytest
import torch

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models import budget
from sam_fast_serve.models.budget import DEFAULT_CHUNK_BYTES, chunk_bytes, items_that_fit, set_chunk_bytes
from sam_fast_serve.server.config import load_service_config

MiB = 2**20
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 1)


@pytest.fixture(autouse=True)
def worker_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "_bound", DEFAULT_CHUNK_BYTES)


def test_the_cpu_takes_the_bound_or_its_own_speed_size() -> None:
    set_chunk_bytes(10 * MiB)
    assert items_that_fit(MiB, CPU) == 10
    assert items_that_fit(MiB, CPU, cpu_bytes=4 * MiB) == 4
    assert items_that_fit(MiB, CPU, cpu_bytes=64 * MiB) == 10
    assert items_that_fit(3 * MiB, CPU) == 3


def test_one_item_is_taken_even_where_it_alone_is_larger() -> None:
    set_chunk_bytes(MiB)
    assert items_that_fit(64 * MiB, CPU) == 1


def test_a_bound_needs_a_byte() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        set_chunk_bytes(0)


def test_cuda_takes_a_share_of_the_free_memory_of_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory: the driver's 12 MiB and 4 MiB the caching allocator holds unused, a quarter of which
    is 4 MiB; asked of the step's device; the CPU's speed size does not apply."""
    asked = []

    def free_and_total(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 12 * MiB, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_and_total)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * MiB)
    assert chunk_bytes(CUDA) == 4 * MiB
    assert items_that_fit(MiB, CUDA, cpu_bytes=MiB) == 4
    set_chunk_bytes(2 * MiB)
    assert items_that_fit(MiB, CUDA) == 2
    assert set(asked) == {CUDA}


def test_the_handler_key_sets_a_bound_of_at_least_a_mebibyte() -> None:
    assert load_service_config(None).max_chunk_bytes == DEFAULT_CHUNK_BYTES
    assert load_service_config({"max_chunk_bytes": 64 * MiB}).max_chunk_bytes == 64 * MiB
    for bad in (MiB - 1, "1GB", 1.5):
        with pytest.raises(ConfigError, match="max_chunk_bytes"):
            load_service_config({"max_chunk_bytes": bad})
