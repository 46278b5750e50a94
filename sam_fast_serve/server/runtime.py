"""Process-wide CPU settings of a worker: how many threads torch runs, and how freed memory is kept.

Threads: torch starts one thread per core it sees, and it sees every core of the host: in a
container with a CPU limit of 2 on a 64-core node that is 64 threads fighting over 2 cores, and with
2 workers on 2 cores each worker's 2 threads fight the other's. Either way every parallel region of
the engine waits for a thread the kernel has descheduled, and an image takes many times longer
(bench_replicas: 2 instances x 2 threads on 2 cores were 6x slower than 2 x 1). An explicit
OMP_NUM_THREADS always wins.

Memory: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap
and unmaps it when freed, so each large activation is page-faulted in anew, every time. Served from
the heap instead and kept when freed, the same memory is reused by the next request.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")
# glibc mallopt parameters (malloc.h) and the freed memory the heap keeps before returning any.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
KEEP_FREED_BYTES = 1 << 30


def cpu_quota(root: Path = CGROUP) -> float | None:
    """The CPU limit of this container in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), or
    None when there is none or it cannot be read."""
    try:
        limit, length = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(length)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_budget(root: Path = CGROUP) -> int:
    """Cores this process may use: its CPU affinity, capped by the container's CPU limit (rounded up)."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def configure_threads(workers: int, root: Path = CGROUP) -> int:
    """Give torch this worker's share of the CPU budget (at least 1 thread) unless OMP_NUM_THREADS
    says otherwise; returns the number of threads torch now uses."""
    if os.environ.get("OMP_NUM_THREADS"):
        logger.info("torch threads: %d (OMP_NUM_THREADS)", torch.get_num_threads())
        return torch.get_num_threads()
    budget = cpu_budget(root)
    threads = max(1, budget // max(1, workers))
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%d cores for %d worker(s))", threads, budget, workers)
    return threads


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap (no mmap) and keep up to KEEP_FREED_BYTES of
    freed memory for reuse; returns False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
