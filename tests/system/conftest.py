"""Fixtures the system tests share, each built once per session: TorchServe starts and virtualenv
builds are what these tests spend most on, and on a 2-core CPU each start is tens of seconds.

`server` is TorchServe serving the smoke archive of test_vit as it ships (no overrides): a module
that needs other settings defines its own `server`, which takes precedence there. Tests that use
the shared one leave it as they found it (they may add requests, never change its models or
workers) and count what it logs as differences, never as totals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.archives import running_server
from harness.servers import REPO, TorchServe

# What a source distribution of the package holds: the build needs no other file of the checkout.
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "sam_fast_serve")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, random_checkpoint: Path) -> Iterator[TorchServe]:
    with running_server(tmp_path_factory.mktemp("torchserve"), random_checkpoint) as ts:
        yield ts


@pytest.fixture(scope="session")
def client_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh virtualenv with the package installed, no extra. Built from a
    copy of the package's files, so that the build leaves nothing behind in the checkout."""
    work = tmp_path_factory.mktemp("client-install")
    source = work / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=300)
    bin_dir = work / "venv" / "bin"
    installed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stderr
    return bin_dir
