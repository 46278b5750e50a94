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
import yaml

import sam_fast_serve
from harness.archives import random_checkpoint_name, smoke_config
from harness.servers import REPO, free_port
from sam_fast_serve.models.registry import model_type, official_checkpoints
from sam_fast_serve.tools.archive import PACKAGE_DIR, runtime_subpackages

BIN = Path(sys.executable).parent
HANDLER = REPO / "custom_handler.py"


def serve_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sam-fast-serve"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module", params=["test_vit", "test_sam2.1_hiera", "test_sam3"])
def archive(request, tmp_path_factory) -> Path:
    """An archive of each family's test architecture, built the way the Makefile builds it: both
    steps through the console command, the smoke config naming the model type."""
    work = tmp_path_factory.mktemp("archive")
    checkpoint = work / random_checkpoint_name(request.param)
    made = serve_cli("random-checkpoint", str(checkpoint), "--model-type", request.param)
    assert made.returncode == 0, made.stderr
    (work / "config.yaml").write_text(yaml.safe_dump(smoke_config(request.param, checkpoint.name)))
    built = serve_cli(
        "archive", "--checkpoint", str(checkpoint), "--config", str(work / "config.yaml"),
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


def _package_files(subpackages: list[str]) -> set[str]:
    files = {"sam_fast_serve/__init__.py"}
    for name in subpackages:
        files |= {str(path.relative_to(PACKAGE_DIR.parent)) for path in (PACKAGE_DIR / name).rglob("*.py")}
    return files


def test_archive_holds_only_what_the_handler_imports(archive, tmp_path):
    with tarfile.open(archive) as tgz:
        names = {m.name.removeprefix("sam-fast/") for m in tgz.getmembers() if not m.isdir()}
        tgz.extractall(tmp_path, filter="data")
    model_dir = tmp_path / "sam-fast"  # TorchServe unpacks the archive into a directory of this name
    config = yaml.safe_load((model_dir / "config.yaml").read_text())["handler"]
    modules = _package_files(runtime_subpackages(HANDLER))
    family = model_type(config["model_type"]).family
    weights = (
        {f"{config['sam_checkpoint']}/{name}" for name in family.checkpoint_files}
        if family.checkpoint_folder
        else {config["sam_checkpoint"]}
    )
    assert names == {"MAR-INF/MANIFEST.json", "custom_handler.py", "config.yaml", *weights, *modules}
    assert not any(name.startswith(("sam_fast_serve/client/", "sam_fast_serve/tools/")) for name in names)
    # Load the model as a worker does, with the archive directory alone on the path (the site's
    # packages aside): every package module it loads comes from the archive.
    script = (
        "import sys, yaml, custom_handler\n"
        "from pathlib import Path\n"
        "from sam_fast_serve.server.service import MaskService\n"
        "section = yaml.safe_load(Path('config.yaml').read_text())['handler']\n"
        "service = MaskService.load(section, Path('.'), None)\n"
        "print(service.engine.model.family.name)\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'sam_fast_serve'))"
    )
    env = {**os.environ, "PYTHONPATH": str(model_dir)}
    loaded = subprocess.run([sys.executable, "-c", script], cwd=model_dir, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    loaded_family, *files = loaded.stdout.split()
    assert loaded_family == family.name
    assert {Path(line).resolve().is_relative_to(model_dir.resolve()) for line in files} == {True}
    assert {str(Path(line).relative_to(model_dir)) for line in files} <= modules
    assert f"sam_fast_serve/models/{family.name}/engine.py" in {
        str(Path(line).relative_to(model_dir)) for line in files
    }


def test_runtime_excludes_tooling_and_client():
    runtime = set(runtime_subpackages(HANDLER))
    assert runtime == {"common", "models", "server"}


def test_checkpoint_name_and_missing_checkpoint(tmp_path):
    named = serve_cli("checkpoint-name", "--config", "model-config.yaml")
    assert named.returncode == 0 and named.stdout.strip() == "sam_vit_b_01ec64.pth"
    missing = serve_cli(
        "archive", "--checkpoint", str(tmp_path / "sam_vit_b_01ec64.pth"), "--config", "model-config.yaml",
        "--export-path", str(tmp_path),
    )  # fmt: skip
    official = official_checkpoints()["sam_vit_b_01ec64.pth"]
    assert missing.returncode == 1 and "no SAM checkpoint" in missing.stderr
    assert official.url in missing.stderr and official.sha256 in missing.stderr
    smoke = serve_cli("checkpoint-name", "--config", "tests/smoke-config.yaml", cwd=REPO)
    assert smoke.stdout.strip() == "random_vit_b.pth"


def test_wait_ready_gives_up_on_a_server_that_is_not_there(tmp_path):
    waited = serve_cli(
        "wait-ready", "--management-url", f"http://127.0.0.1:{free_port()}", "--key-file", str(tmp_path / "none.json"),
        "--timeout", "1",
    )  # fmt: skip
    assert waited.returncode == 1 and "not READY after 1 s" in waited.stderr


def test_no_sys_path_edits_anywhere():
    sources = [
        *REPO.glob("*.py"),
        *REPO.glob("sam_fast_serve/**/*.py"),
        *REPO.glob("tests/**/*.py"),
        *REPO.glob("harness/*.py"),
        *REPO.glob("benchmarks/*.py"),
    ]
    assert len(sources) > 30
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*(\+?=|\[)")
    assert [str(p.relative_to(REPO)) for p in sources if edit.search(p.read_text())] == []
