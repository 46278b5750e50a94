"""Packaging and running helpers used by the Makefile and the tests.

python -m sam_fast_serve.deploy archive [--checkpoint PATH] [--config PATH] [--export-path DIR]
python -m sam_fast_serve.deploy wait-ready [--model NAME] [--timeout S]
python -m sam_fast_serve.deploy random-checkpoint PATH [--model-type vit_b]
python -m sam_fast_serve.deploy download [--config PATH] [--dest PATH]
python -m sam_fast_serve.deploy samples DIR

Nothing here imports ts: TorchServe is driven through its command-line tools and HTTP API.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import requests
import yaml

from .checkpoints import OFFICIAL_CHECKPOINTS, official_for_model_type
from .config import load_service_config
from .errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "sam-fast"


def checkpoint_name(config_path: Path) -> str:
    """The checkpoint file name the model config asks for (validated with the config)."""
    with open(config_path) as f:
        config = load_service_config((yaml.safe_load(f) or {}).get("handler"))
    return config.sam_checkpoint or official_for_model_type(config.model_type).file_name


def missing_checkpoint_message(path: Path) -> str:
    """What to tell a user whose checkpoint file is not there."""
    official = OFFICIAL_CHECKPOINTS.get(path.name)
    lines = [f"No SAM checkpoint at {path}."]
    if official is not None:
        lines.append(
            f"Download it (sha256 {official.sha256}):\n  curl -L -o {path} {official.url}"
        )
    lines.append("Or use a checkpoint you have: make archive SAM_CHECKPOINT=/path/to/sam_vit_b_01ec64.pth")
    lines.append("Or, to check the plumbing without real weights: make smoke (random weights, meaningless masks)")
    return "\n".join(lines)


def build_archive(checkpoint: Path, config: Path, export_path: Path, model_name: str = MODEL_NAME) -> Path:
    """Package handler, core package, checkpoint and config into `<export_path>/<model_name>.tar.gz`.

    The checkpoint is stored under the file name the config names. Raises ConfigError when the
    config is invalid or the checkpoint is missing.
    """
    name = checkpoint_name(config)
    if not checkpoint.is_file():
        raise ConfigError(missing_checkpoint_message(checkpoint))
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging_dir:
        staging = Path(staging_dir)
        # torch-model-archiver copies a directory's *contents* into the archive root, so the
        # package goes one level down to keep its name.
        extra = staging / "extra"
        shutil.copytree(REPO / "sam_fast_serve", extra / "sam_fast_serve", ignore=shutil.ignore_patterns("__pycache__"))
        weights = staging / name
        weights.symlink_to(checkpoint.resolve())
        subprocess.run(
            [
                str(Path(sys.executable).parent / "torch-model-archiver"),
                "--model-name", model_name,
                "--version", "1.0",
                "--handler", str(REPO / "custom_handler.py"),
                "--serialized-file", str(weights),
                "--extra-files", str(extra),
                "--config-file", str(config),
                "--archive-format", "tgz",
                "--export-path", str(export_path),
                "-f",
            ],
            check=True,
        )
    return export_path / f"{model_name}.tar.gz"


def read_token(key_file: Path, api: str) -> str:
    """A TorchServe token ('inference' or 'management') from the key_file.json it writes."""
    with open(key_file) as f:
        return json.load(f)[api]["key"]


def wait_until_ready(management_url: str, model: str, key_file: Path, timeout: float) -> float:
    """Poll the management API until `model` has a READY worker; returns the seconds waited.

    /ping answers healthy before the model is loaded, so it is not used. Raises TimeoutError.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            headers = {"Authorization": f"Bearer {read_token(key_file, 'management')}"}
            reply = requests.get(f"{management_url}/models/{model}", headers=headers, timeout=5)
            if reply.ok and any(w.get("status") == "READY" for w in reply.json()[0].get("workers", [])):
                return time.monotonic() - started
        except (OSError, ValueError, KeyError, IndexError):
            pass  # server still starting: no key file, no listener or no worker yet
        time.sleep(0.5)
    raise TimeoutError(f"model {model!r} not READY after {timeout:.0f} s (see logs/model_log.log)")


def save_random_checkpoint(path: Path, model_type: str = "vit_b", seed: int = 0) -> Path:
    """Write a checkpoint of random weights (for smoke runs and tests only: its masks mean nothing)."""
    import torch

    from .build import sam_model_fast_registry

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam_model_fast_registry[model_type](None).state_dict(), path)
    return path


def download_checkpoint(config: Path, dest: Path) -> Path:
    """Download the official checkpoint the config names to `dest`, verifying its sha256.

    Raises ConfigError when the name is not an official one, the download fails (no network:
    the message says how to use a local file instead) or the hash differs.
    """
    import urllib.request

    from .checkpoints import file_sha256

    official = OFFICIAL_CHECKPOINTS.get(checkpoint_name(config))
    if official is None:
        raise ConfigError(f"{checkpoint_name(config)!r} is not an official checkpoint; put the file at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".part")
    print(f"downloading {official.url} -> {dest}")
    try:
        urllib.request.urlretrieve(official.url, partial)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"could not download {official.url} ({exc}).\n"
            "No SAM weights can be downloaded on this machine. Copy the file from a machine that can, then:\n"
            f"  make demo SAM_CHECKPOINT=/path/to/{official.file_name}\n"
            "or check the plumbing with random weights (meaningless masks): make smoke"
        ) from exc
    digest = file_sha256(partial)
    if digest != official.sha256:
        partial.unlink()
        raise ConfigError(f"downloaded file has sha256 {digest}, expected {official.sha256}; try again")
    partial.rename(dest)
    return dest


def write_samples(directory: Path) -> None:
    """Write the sample photos that ship with scikit-image as PNG files."""
    import cv2
    from skimage import data

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "chelsea"):
        rgb = getattr(data, name)()
        cv2.imwrite(str(directory / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam_fast_serve.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    archive = sub.add_parser("archive", help="build model_store/sam-fast.tar.gz")
    archive.add_argument("--checkpoint", type=Path)
    archive.add_argument("--config", type=Path, default=REPO / "model-config.yaml")
    archive.add_argument("--export-path", type=Path, default=REPO / "model_store")
    archive.add_argument("--model-name", default=MODEL_NAME)
    wait = sub.add_parser("wait-ready", help="wait until the model has a READY worker")
    wait.add_argument("--management-url", default="http://127.0.0.1:8081")
    wait.add_argument("--model", default=MODEL_NAME)
    wait.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    wait.add_argument("--timeout", type=float, default=600)
    random = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (smoke mode)")
    random.add_argument("path", type=Path)
    random.add_argument("--model-type", default="vit_b")
    download = sub.add_parser("download", help="download the official checkpoint the config names")
    download.add_argument("--config", type=Path, default=REPO / "model-config.yaml")
    download.add_argument("--dest", type=Path)
    samples = sub.add_parser("samples", help="write sample images")
    samples.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "archive":
            checkpoint = args.checkpoint or REPO / "checkpoints" / checkpoint_name(args.config)
            print(build_archive(checkpoint, args.config, args.export_path, args.model_name))
        elif args.command == "wait-ready":
            seconds = wait_until_ready(args.management_url, args.model, args.key_file, args.timeout)
            print(f"{args.model} READY after {seconds:.1f} s")
        elif args.command == "download":
            print(download_checkpoint(args.config, args.dest or REPO / "checkpoints" / checkpoint_name(args.config)))
        elif args.command == "samples":
            write_samples(args.directory)
        else:
            print(save_random_checkpoint(args.path, args.model_type))
    except (ConfigError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
