"""Real model archives with the smoke config, TorchServe serving them, and the client run against it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from harness.servers import REPO, TorchServe
from sam_fast_serve.common.endpoint import MODEL_NAME
from sam_fast_serve.common.options import AMG_RULES
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.tools.archive import build_archive

# Every mask is kept (random weights give no mask above the default thresholds), on a small grid.
KEEP_ALL = {
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
}


def random_checkpoint_name(model: str) -> str:
    """How the tests name a random checkpoint of `model`: random_<model_type>.pth, or
    random_<model_type> for a family whose checkpoint is a folder."""
    return f"random_{model}" + ("" if model_type(model).family.checkpoint_folder else ".pth")


def model_type_of(checkpoint: Path) -> str:
    """The model type of a random checkpoint named by `random_checkpoint_name`."""
    stem = checkpoint.name.rsplit(".", 1)[0] if checkpoint.suffix == ".pth" else checkpoint.name
    if not stem.startswith("random_") or random_checkpoint_name(stem.removeprefix("random_")) != checkpoint.name:
        raise ValueError(f"{checkpoint.name}: not a random checkpoint named by random_checkpoint_name")
    return stem.removeprefix("random_")


def smoke_config(model: str, checkpoint_name: str) -> dict[str, Any]:
    """tests/smoke-config.yaml for `model` and its checkpoint: its automatic settings kept only for a
    family with automatic mask generation."""
    config = yaml.safe_load((REPO / "tests" / "smoke-config.yaml").read_text())
    family = model_type(model).family
    config["handler"] = {
        key: value for key, value in config["handler"].items() if key not in AMG_RULES or key in family.amg_keys
    }
    config["handler"].update(model_type=model, sam_checkpoint=checkpoint_name)
    return config


def smoke_archive(workdir: Path, checkpoint: Path, model_name: str = MODEL_NAME, **overrides: Any) -> Path:
    """A real archive in workdir/model_store of `checkpoint` (named by `random_checkpoint_name`) with
    the smoke config for its model type plus `overrides` (top-level TorchServe keys, or `handler`
    keys given as handler={...})."""
    config = smoke_config(model_type_of(checkpoint), checkpoint.name)
    config["handler"].update(overrides.pop("handler", {}))
    config.update(overrides)
    (workdir / f"{model_name}-config.yaml").write_text(yaml.safe_dump(config))
    return build_archive(
        REPO / "custom_handler.py",
        checkpoint,
        workdir / f"{model_name}-config.yaml",
        workdir / "model_store",
        model_name,
    )


@contextlib.contextmanager
def running_server(workdir: Path, checkpoint: Path, **overrides: Any) -> Iterator[TorchServe]:
    """TorchServe serving a smoke_archive (see there for `overrides`); stopped in every case."""
    archive = smoke_archive(workdir, checkpoint, **overrides)
    server = TorchServe(workdir, archive.parent, archive.name)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client_command(server: TorchServe | None = None) -> list[str]:
    """The client as users run it from a checkout (`python inference.py`), pointed at `server`."""
    command = [sys.executable, str(REPO / "inference.py")]
    if server is not None:
        # --token=VALUE: a TorchServe token may begin with "-", which argparse would take for an option.
        command += ["--url", server.inference_url, f"--token={server.token()}"]
    return command


def run_client(
    *args: object, server: TorchServe | None = None, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run the client with `args` to the end; its output captured as text."""
    return subprocess.run(
        [*client_command(server), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )
