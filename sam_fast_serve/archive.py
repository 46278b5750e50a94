"""The model archive: the handler, the package modules it imports (nothing else of the package),
the checkpoint under the file name the config names, and the config; stamped with our version."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from . import __version__
from .checkpoints import where_to_get
from .config import load_service_config
from .endpoint import MODEL_NAME
from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def config_checkpoint_file(config: Path) -> str:
    """The checkpoint file name a model-config.yaml asks for (its `handler:` section validated)."""
    with open(config) as f:
        section = (yaml.safe_load(f) or {}).get("handler")
    return load_service_config(section).checkpoint_file


def _imported_modules(source: Path, package_relative: bool) -> set[str]:
    """Names of the package's modules that `source` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and package_relative:
                base = f"{PACKAGE}.{node.module}" if node.module else PACKAGE
            elif node.level == 0 and node.module:
                base = node.module
            else:
                continue
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) <= 2:
                found.add(parts[1] if len(parts) == 2 else "__init__")
    return {m for m in found if (PACKAGE_DIR / f"{m}.py").is_file()}


def runtime_modules(handler: Path) -> list[str]:
    """The package's module names (without .py) that `handler` needs: its imports, theirs, and
    so on, plus `__init__` (run on every import of the package)."""
    needed = {"__init__"}
    todo = list(_imported_modules(handler, package_relative=False))
    while todo:
        module = todo.pop()
        if module not in needed:
            needed.add(module)
            todo.extend(_imported_modules(PACKAGE_DIR / f"{module}.py", package_relative=True))
    return sorted(needed)


def _model_archiver() -> str:
    beside = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside) if beside.is_file() else shutil.which("torch-model-archiver")
    if found is None:
        raise ConfigError("torch-model-archiver not found: install the server with pip install 'sam-fast-serve[serve]'")
    return found


def build_archive(
    handler: Path, checkpoint: Path, config: Path, export_path: Path, model_name: str = MODEL_NAME
) -> Path:
    """Package `handler`, the modules it needs, `checkpoint` and `config` into
    `<export_path>/<model_name>.tar.gz`, version `__version__`; returns that path.

    The checkpoint is stored under the file name the config names. Raises ConfigError when the
    config is invalid or the checkpoint or handler is missing.
    """
    name = config_checkpoint_file(config)
    if not checkpoint.is_file():
        hint = where_to_get(name) or "use a checkpoint you have"
        raise ConfigError(f"no SAM checkpoint at {checkpoint}: {hint}, or random weights for a smoke test (make smoke)")
    if not handler.is_file():
        raise ConfigError(f"no handler file at {handler} (custom_handler.py of the sam-fast-serve repository)")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging_dir:
        staging = Path(staging_dir)
        # torch-model-archiver copies a directory's *contents* into the archive root, so the
        # package goes one level down to keep its name.
        package = staging / "extra" / PACKAGE
        package.mkdir(parents=True)
        for module in runtime_modules(handler):
            shutil.copy2(PACKAGE_DIR / f"{module}.py", package / f"{module}.py")
        weights = staging / name
        weights.symlink_to(checkpoint.resolve())
        subprocess.run(
            [
                _model_archiver(),
                "--model-name", model_name,
                "--version", __version__,
                "--handler", str(handler),
                "--serialized-file", str(weights),
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
