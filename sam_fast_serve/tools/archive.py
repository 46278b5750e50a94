"""The model archive: the handler, the package's subpackages it imports (whole; not the client or the
tools), the checkpoint under the file name the config names, and the config; stamped with our version."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from sam_fast_serve import __version__
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.checkpoints import where_to_get
from sam_fast_serve.models.registry import Family
from sam_fast_serve.server.config import ServiceConfig, load_service_config

# The package root (this module is in its tools/ subpackage).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = PACKAGE_DIR.name


def _service_config(config: Path) -> ServiceConfig:
    """A model-config.yaml's `handler:` section, validated."""
    with open(config) as f:
        section = (yaml.safe_load(f) or {}).get("handler")
    return load_service_config(section)


def config_checkpoint_file(config: Path) -> str:
    """The checkpoint file (or folder) name a model-config.yaml asks for."""
    return _service_config(config).checkpoint_file


def config_family(config: Path) -> Family:
    """The model family a model-config.yaml asks for."""
    return _service_config(config).family


def _imported_subpackages(source: Path) -> set[str]:
    """The package's subpackages (folders directly under it) that `source` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(
            parts[1] for parts in (name.split(".") for name in names) if parts[0] == PACKAGE and len(parts) > 1
        )
    return {name for name in found if (PACKAGE_DIR / name / "__init__.py").is_file()}


def runtime_subpackages(handler: Path) -> list[str]:
    """The subpackages `handler` needs, whole: those it imports, those any of their modules import,
    and so on. A family's code is in models/, which goes whole, so one archive serves any family."""
    needed: set[str] = set()
    todo = list(_imported_subpackages(handler))
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            for source in (PACKAGE_DIR / name).rglob("*.py"):
                todo.extend(_imported_subpackages(source))
    return sorted(needed)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _model_archiver() -> str:
    beside = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside) if beside.is_file() else shutil.which("torch-model-archiver")
    if found is None:
        raise ConfigError("torch-model-archiver not found: install the server with pip install 'sam-fast-serve[serve]'")
    return found


def build_archive(
    handler: Path, checkpoint: Path, config: Path, export_path: Path, model_name: str = MODEL_NAME
) -> Path:
    """Package `handler`, the subpackages it needs, `checkpoint` and `config` into
    `<export_path>/<model_name>.tar.gz`, version `__version__`; returns that path.

    The checkpoint (a file, or a folder for a family whose checkpoint is one) is stored under the
    name the config names. Raises ConfigError when the config is invalid or the checkpoint or
    handler is missing.
    """
    name = config_checkpoint_file(config)
    family = config_family(config)
    folder = family.checkpoint_folder
    if not (checkpoint.is_dir() if folder else checkpoint.is_file()):
        hint = where_to_get(name) or "use a checkpoint you have"
        kind = "checkpoint folder" if folder else "checkpoint"
        raise ConfigError(f"no SAM {kind} at {checkpoint}: {hint}, or random weights for a smoke test (make smoke)")
    if not handler.is_file():
        raise ConfigError(f"no handler file at {handler} (custom_handler.py of the sam-fast-serve repository)")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging_dir:
        staging = Path(staging_dir)
        # torch-model-archiver copies a directory's *contents* into the archive root, so the
        # package goes one level down to keep its name.
        package = staging / "extra" / PACKAGE
        package.mkdir(parents=True)
        shutil.copy2(PACKAGE_DIR / "__init__.py", package / "__init__.py")
        for subpackage in runtime_subpackages(handler):
            shutil.copytree(
                PACKAGE_DIR / subpackage, package / subpackage, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        if folder:
            # A folder's files travel with the extra files (the archiver takes one serialized file),
            # hard-linked where the file system allows (a SAM 3 folder is 3.4 GB); only its own files.
            missing = [f for f in family.checkpoint_files if not (checkpoint / f).is_file()]
            if missing:
                raise ConfigError(f"{checkpoint} lacks {', '.join(missing)}: not a {family.title} checkpoint folder")
            (package.parent / name).mkdir()
            for file_name in family.checkpoint_files:
                _link_or_copy(str(checkpoint / file_name), str(package.parent / name / file_name))
            weights = []
        else:
            (staging / name).symlink_to(checkpoint.resolve())
            weights = ["--serialized-file", str(staging / name)]
        subprocess.run(
            [
                _model_archiver(),
                "--model-name", model_name,
                "--version", __version__,
                "--handler", str(handler),
                *weights,
                "--extra-files", str(package.parent),
                "--config-file", str(config),
                "--archive-format", "tgz",
                "--export-path", str(export_path),
                "-f",
            ],
            check=True,
            # The archiver stages files in $TMPDIR/<model-name>: two builds of one model name at once
            # (CI beside a developer, two replicas' archives) would share it without a TMPDIR of their own.
            env={**os.environ, "TMPDIR": staging_dir},
        )  # fmt: skip
    return export_path / f"{model_name}.tar.gz"
