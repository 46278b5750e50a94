"""`sam-fast-serve`: build the model archive, fetch weights, wait for a TorchServe, make test data.

    sam-fast-serve archive --checkpoint PATH --config PATH [--handler PATH] [--export-path DIR]
    sam-fast-serve checkpoint-name --config PATH
    sam-fast-serve download --config PATH [--dest PATH]
    sam-fast-serve wait-ready [--management-url URL] [--model NAME] [--key-file PATH] [--timeout S]
    sam-fast-serve random-checkpoint PATH [--model-type vit_b|sam2.1_hiera_tiny|...]
    sam-fast-serve models
    sam-fast-serve samples DIR

Every path is an argument (relative to the working directory); nothing depends on a checkout's
layout. Nothing here imports ts: TorchServe is driven through its command-line tools and HTTP API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sam_fast_serve import __version__
from sam_fast_serve.common.endpoint import KEY_FILE, MANAGEMENT_URL, MODEL_NAME, wait_until_ready
from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.checkpoints import download_checkpoint
from sam_fast_serve.models.registry import MODEL_TYPES, model_type

SAMPLE_IMAGES = ("astronaut", "chelsea")


def save_random_checkpoint(path: Path, name: str = "vit_b", seed: int = 0) -> Path:
    """Write a checkpoint of random weights in the official form of `model_type`'s family (for smoke
    runs and tests only: its masks mean nothing)."""
    import torch

    model = model_type(name)
    family = model.family.module()
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(family.checkpoint_state(family.build(model)), path)
    return path


def write_samples(directory: Path) -> list[Path]:
    """Write the sample photos that ship with scikit-image (a test dependency) as PNG files."""
    from PIL import Image
    from skimage import data

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.png" for name in SAMPLE_IMAGES]
    for name, path in zip(SAMPLE_IMAGES, paths):
        Image.fromarray(getattr(data, name)()).save(path)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-fast-serve", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    archive = sub.add_parser("archive", help="build <export-path>/<model-name>.tar.gz")
    archive.add_argument("--checkpoint", type=Path, required=True, help="the SAM checkpoint (.pth) to package")
    archive.add_argument("--config", type=Path, required=True, help="the model-config.yaml to package")
    archive.add_argument("--handler", type=Path, default=Path("custom_handler.py"))
    archive.add_argument("--export-path", type=Path, default=Path("model_store"))
    archive.add_argument("--model-name", default=MODEL_NAME)
    name = sub.add_parser("checkpoint-name", help="print the checkpoint file name the config names")
    name.add_argument("--config", type=Path, required=True)
    download = sub.add_parser("download", help="download the official checkpoint the config names")
    download.add_argument("--config", type=Path, required=True)
    download.add_argument("--dest", type=Path, help="where to write it (default: its file name, here)")
    wait = sub.add_parser("wait-ready", help="wait until the model has a READY worker")
    wait.add_argument("--management-url", default=MANAGEMENT_URL)
    wait.add_argument("--model", default=MODEL_NAME)
    wait.add_argument("--key-file", type=Path, default=KEY_FILE)
    wait.add_argument("--timeout", type=float, default=600)
    random = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (smoke mode)")
    random.add_argument("path", type=Path)
    random.add_argument("--model-type", default="vit_b", choices=tuple(MODEL_TYPES), help="default: vit_b")
    sub.add_parser("models", help="print the table of model types (family, parameters, checkpoint)")
    samples = sub.add_parser("samples", help="write sample photos (needs scikit-image)")
    samples.add_argument("directory", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("archive", "checkpoint-name", "download"):
            from sam_fast_serve.tools.archive import build_archive, config_checkpoint_file

            file_name = config_checkpoint_file(args.config)
            if args.command == "archive":
                print(build_archive(args.handler, args.checkpoint, args.config, args.export_path, args.model_name))
            elif args.command == "checkpoint-name":
                print(file_name)
            else:
                print(download_checkpoint(file_name, args.dest or Path(file_name)))
        elif args.command == "wait-ready":
            seconds = wait_until_ready(args.management_url, args.model, args.key_file, args.timeout)
            print(f"{args.model} READY after {seconds:.1f} s")
        elif args.command == "random-checkpoint":
            print(save_random_checkpoint(args.path, args.model_type))
        elif args.command == "models":
            from sam_fast_serve.tools.docs import models_table

            print(models_table(), end="")
        else:
            for path in write_samples(args.directory):
                print(path)
    except (ConfigError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
