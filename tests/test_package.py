"""The package as users install and run it: console commands, the model archive's contents and
version, and no sys.path tricks."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from local_server import REPO, free_port

import sam_fast_serve
from sam_fast_serve.archive import PACKAGE_DIR, runtime_modules
from sam_fast_serve.checkpoints import OFFICIAL_CHECKPOINTS

BIN = Path(sys.executable).parent
HANDLER = REPO / "custom_handler.py"


def serve_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sam-fast-serve"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """An archive built the way the Makefile builds it: both steps through the console command."""
    work = tmp_path_factory.mktemp("archive")
    made = serve_cli("random-checkpoint", str(work / "random_vit_b.pth"))
    assert made.returncode == 0, made.stderr
    built = serve_cli(
        "archive", "--checkpoint", str(work / "random_vit_b.pth"), "--config", "tests/smoke-config.yaml",
        "--handler", "custom_handler.py", "--export-path", str(work / "store"),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    path = Path(built.stdout.strip().splitlines()[-1])
    assert path == work / "store" / "sam-fast.tar.gz" and path.is_file()
    return path


def test_version_is_one_fact(archive):
    assert importlib.metadata.version("sam-fast-serve") == sam_fast_serve.__version__
    for command in ("sam-fast-serve", "sam-fast-client"):
        shown = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and sam_fast_serve.__version__ in shown.stdout.split(), shown
    with tarfile.open(archive) as tgz:
        manifest = json.load(tgz.extractfile("sam-fast/MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelVersion"] == sam_fast_serve.__version__


def test_archive_holds_only_what_the_handler_imports(archive, tmp_path):
    with tarfile.open(archive) as tgz:
        names = {m.name.removeprefix("sam-fast/") for m in tgz.getmembers() if not m.isdir()}
        tgz.extractall(tmp_path, filter="data")
    model_dir = tmp_path / "sam-fast"  # TorchServe unpacks the archive into a directory of this name
    modules = {f"sam_fast_serve/{m}.py" for m in runtime_modules(HANDLER)}
    assert names == {"MAR-INF/MANIFEST.json", "custom_handler.py", "smoke-config.yaml", "random_vit_b.pth", *modules}
    for tooling in ("cli", "archive", "client", "endpoint", "local_server", "agreement"):
        assert f"sam_fast_serve/{tooling}.py" not in names
    # Import the handler as a worker does (the archive directory first on the path): every
    # package module it loads comes from the archive, and every module of the archive is loaded.
    script = (
        "import sys, custom_handler\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'sam_fast_serve'))"
    )
    env = {**os.environ, "PYTHONPATH": str(model_dir)}
    loaded = subprocess.run([sys.executable, "-c", script], cwd=model_dir, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    files = {Path(line) for line in loaded.stdout.split()}
    assert {str(path.relative_to(model_dir)) for path in files} == modules


def test_runtime_excludes_tooling_and_client():
    runtime = set(runtime_modules(HANDLER))
    shipped = {path.stem for path in PACKAGE_DIR.glob("*.py")}
    assert runtime < shipped
    assert {"cli", "archive", "endpoint"} <= shipped - runtime


def test_checkpoint_name_and_missing_checkpoint(tmp_path):
    named = serve_cli("checkpoint-name", "--config", "model-config.yaml")
    assert named.returncode == 0 and named.stdout.strip() == "sam_vit_b_01ec64.pth"
    missing = serve_cli(
        "archive", "--checkpoint", str(tmp_path / "sam_vit_b_01ec64.pth"), "--config", "model-config.yaml",
        "--export-path", str(tmp_path),
    )  # fmt: skip
    official = OFFICIAL_CHECKPOINTS["sam_vit_b_01ec64.pth"]
    assert missing.returncode == 1 and "no SAM checkpoint" in missing.stderr
    assert official.url in missing.stderr and official.sha256 in missing.stderr
    bad = serve_cli("checkpoint-name", "--config", "tests/smoke-config.yaml", cwd=REPO)
    assert bad.stdout.strip() == "random_vit_b.pth"


def test_wait_ready_gives_up_on_a_server_that_is_not_there(tmp_path):
    waited = serve_cli(
        "wait-ready", "--management-url", f"http://127.0.0.1:{free_port()}", "--key-file", str(tmp_path / "none.json"),
        "--timeout", "1",
    )  # fmt: skip
    assert waited.returncode == 1 and "not READY after 1 s" in waited.stderr


def test_no_sys_path_edits_anywhere():
    sources = [
        *REPO.glob("*.py"),
        *REPO.glob("sam_fast_serve/*.py"),
        *REPO.glob("tests/*.py"),
        *REPO.glob("benchmarks/*.py"),
    ]
    assert len(sources) > 30
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*(\+?=|\[)")
    assert [str(p.relative_to(REPO)) for p in sources if edit.search(p.read_text())] == []
