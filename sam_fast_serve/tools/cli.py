"""`sam-fast-serve`: the server's tools (archive, weights, readiness, team gateway, test data, docs).

    sam-fast-serve archive --checkpoint PATH --config PATH [--handler PATH] [--export-path DIR] [--model-name NAME]
    sam-fast-serve checkpoint-name --config PATH
    sam-fast-serve download --config PATH [--dest PATH]
    sam-fast-serve start --models NAME=ARCHIVE... [--run-dir DIR] [--ts-config PATH] [--model-store DIR] [--port N]
    sam-fast-serve stop [--run-dir DIR]
    sam-fast-serve wait-ready [--management-url URL] [--model NAME] [--key-file PATH] [--run-dir DIR] [--timeout S]
    sam-fast-serve team --listen HOST:PORT [--inference-url URL] [--key-file PATH] [--dir DIR] ...
    sam-fast-serve team-stop [--dir DIR]
    sam-fast-serve random-checkpoint PATH [--model-type vit_b|sam2.1_hiera_tiny|sam3|...]
    sam-fast-serve models
    sam-fast-serve docs DIR
    sam-fast-serve samples DIR

Every path is an argument (relative to the working directory); nothing depends on a checkout's
layout. Nothing here imports ts: TorchServe is driven through its command-line tools and HTTP API.
A subcommand that needs packages of an extra the install lacks (the client install has no PyYAML,
torch or scikit-image) says which extra to install, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sam_fast_serve import __version__
from sam_fast_serve.common.endpoint import INFERENCE_URL, KEY_FILE, MANAGEMENT_URL, MODEL_NAME
from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.registry import MODEL_TYPES, model_type
from sam_fast_serve.tools import team
from sam_fast_serve.tools.torchserve import RunFolder, StartError, start, stop, wait_ready

SAMPLE_IMAGES = ("astronaut", "chelsea")
# The run folder of the TorchServe `start` starts (its temp files, logs, config and state).
RUN_DIR = Path("run")
# The extra whose packages each subcommand imports beyond the client install; the others need none.
EXTRA_OF = {
    "archive": "serve",
    "checkpoint-name": "serve",
    "download": "serve",
    "random-checkpoint": "serve",
    "docs": "serve",
    "samples": "test",
}


def save_random_checkpoint(path: Path, name: str = "vit_b", seed: int = 0) -> Path:
    """Write a checkpoint of random weights in the official form of `model_type`'s family, a file or
    a folder (for smoke runs and tests only: its masks mean nothing)."""
    import torch

    model = model_type(name)
    family = model.family.code()
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    family.save_checkpoint(family.build(model), path)
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


def _started_from(run: RunFolder) -> dict:
    """The state `start` wrote in `run`. Raises StartError when there is none."""
    state = run.state()
    if state is None:
        raise StartError(f"no TorchServe was started from {run.path} (make serve starts one)")
    return state


def _model_spec(spec: str) -> tuple[str, str]:
    """NAME=ARCHIVE -> (NAME, ARCHIVE)."""
    name, sep, archive = spec.partition("=")
    if not (sep and name and archive):
        raise ConfigError(f"--models takes NAME=ARCHIVE (e.g. sam-fast=sam-fast.tar.gz), not {spec!r}")
    return name, archive


def _add_timeout(command: argparse.ArgumentParser) -> None:
    """The --timeout of the commands that wait for READY (start, wait-ready)."""
    command.add_argument(
        "--timeout", type=float, default=600, metavar="S", help="seconds to wait at most (default: %(default)s)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-fast-serve", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    archive = sub.add_parser("archive", help="build <export-path>/<model-name>.tar.gz (needs the serve extra)")
    archive.add_argument(
        "--checkpoint", type=Path, required=True, metavar="PATH", help="the SAM checkpoint to package (required)"
    )
    archive.add_argument(
        "--config", type=Path, required=True, metavar="PATH", help="the model-config.yaml to package (required)"
    )
    archive.add_argument(
        "--handler",
        type=Path,
        default=Path("custom_handler.py"),
        metavar="PATH",
        help="the handler file (default: %(default)s)",
    )
    archive.add_argument(
        "--export-path",
        type=Path,
        default=Path("model_store"),
        metavar="DIR",
        help="folder for the archive (default: %(default)s)",
    )
    archive.add_argument(
        "--model-name",
        default=MODEL_NAME,
        metavar="NAME",
        help="archive and model name, /predictions/NAME (default: %(default)s)",
    )

    name = sub.add_parser("checkpoint-name", help="print the checkpoint file name the config names")
    name.add_argument("--config", type=Path, required=True, metavar="PATH", help="a model-config.yaml (required)")

    download = sub.add_parser("download", help="download the official checkpoint the config names, sha256-checked")
    download.add_argument("--config", type=Path, required=True, metavar="PATH", help="a model-config.yaml (required)")
    download.add_argument("--dest", type=Path, metavar="PATH", help="where to write it (default: its file name, here)")

    start = sub.add_parser(
        "start", help="start TorchServe from a run folder of its own and wait until its models are READY"
    )
    start.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="NAME=ARCHIVE",
        help="the models to serve: name=archive file in --model-store (required)",
    )
    start.add_argument(
        "--run-dir",
        type=Path,
        default=RUN_DIR,
        metavar="DIR",
        help="its temp files (the pid file), logs, config and state: one folder a server (default: %(default)s)",
    )
    start.add_argument(
        "--ts-config",
        type=Path,
        default=Path("config.properties"),
        metavar="PATH",
        help="TorchServe's config, every port set (default: %(default)s)",
    )
    start.add_argument(
        "--model-store",
        type=Path,
        default=Path("model_store"),
        metavar="DIR",
        help="the folder of the archives (default: %(default)s)",
    )
    start.add_argument(
        "--port",
        type=int,
        metavar="N",
        help="the inference port; every other port moves by as much (default: the config's)",
    )
    _add_timeout(start)
    stop = sub.add_parser("stop", help="stop the TorchServe of a run folder, and no other")
    stop.add_argument(
        "--run-dir", type=Path, default=RUN_DIR, metavar="DIR", help="its run folder (default: %(default)s)"
    )

    wait = sub.add_parser("wait-ready", help="wait until the model has a READY worker (exit 1 when it cannot be)")
    wait.add_argument(
        "--management-url",
        default=MANAGEMENT_URL,
        metavar="URL",
        help="TorchServe's management API (default: %(default)s)",
    )
    wait.add_argument("--model", default=MODEL_NAME, metavar="NAME", help="model name (default: %(default)s)")
    wait.add_argument(
        "--key-file",
        type=Path,
        default=KEY_FILE,
        metavar="PATH",
        help="the key file TorchServe wrote (default: %(default)s)",
    )
    wait.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="the run folder of a server `start` started: its management URL and key file, and give up as soon as "
        "it exits or its model fails to load (default: none, the management API alone is watched)",
    )
    _add_timeout(wait)

    serve_team = sub.add_parser(
        "team", help=f"serve this host's TorchServe to other machines through nginx with the token ${team.TOKEN_ENV}"
    )
    serve_team.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="HOST:PORT of the gateway, the one address other machines reach: 0.0.0.0:8000 for all "
        "interfaces (required: binding beyond loopback is always asked for)",
    )
    serve_team.add_argument(
        "--inference-url",
        default=INFERENCE_URL,
        metavar="URL",
        help="TorchServe's inference API (default: %(default)s)",
    )
    serve_team.add_argument(
        "--key-file",
        type=Path,
        default=KEY_FILE,
        metavar="PATH",
        help="the key file TorchServe wrote (default: %(default)s)",
    )
    serve_team.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="the run folder of a TorchServe `start` started: its inference URL and key file instead of both options "
        "(default: none, both options)",
    )
    serve_team.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        default=team.default_dir(),
        help="the gateway's config, token, pid and logs, never a checkout (default: %(default)s)",
    )
    serve_team.add_argument(
        "--template",
        type=Path,
        metavar="PATH",
        default=Path("deploy/nginx/team.conf"),
        help="the nginx config to fill in (default: %(default)s)",
    )
    serve_team.add_argument(
        "--gateway-js",
        type=Path,
        metavar="PATH",
        default=Path("deploy/kubernetes/gateway.js"),
        help="the token check nginx runs (default: %(default)s)",
    )
    serve_team.add_argument(
        "--nginx", default="nginx", metavar="PROGRAM", help="the nginx program (default: %(default)s)"
    )
    stop_team = sub.add_parser("team-stop", help="stop the team gateway")
    stop_team.add_argument(
        "--dir",
        type=Path,
        default=team.default_dir(),
        metavar="DIR",
        help="the gateway's folder (default: %(default)s)",
    )

    random = sub.add_parser(
        "random-checkpoint", help="write a random-weight checkpoint (smoke mode; needs the serve extra)"
    )
    random.add_argument("path", type=Path, help="where to write it")
    random.add_argument(
        "--model-type",
        default="vit_b",
        choices=tuple(MODEL_TYPES),
        metavar="TYPE",
        help="model type (default: %(default)s)",
    )
    sub.add_parser("models", help="print the table of model types (family, parameters, checkpoint)")
    docs = sub.add_parser("docs", help="rewrite the generated tables of the docs pages in DIR")
    docs.add_argument("directory", type=Path, metavar="DIR", help="the docs folder (docs/ of a checkout)")
    samples = sub.add_parser("samples", help="write sample photos (needs the test extra: scikit-image)")
    samples.add_argument("directory", type=Path, metavar="DIR", help="folder to write them to")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command in ("archive", "checkpoint-name", "download"):
        from sam_fast_serve.models.checkpoints import download_checkpoint
        from sam_fast_serve.tools.archive import build_archive, config_checkpoint_file

        file_name = config_checkpoint_file(args.config)
        if args.command == "archive":
            print(build_archive(args.handler, args.checkpoint, args.config, args.export_path, args.model_name))
        elif args.command == "checkpoint-name":
            print(file_name)
        else:
            print(download_checkpoint(file_name, args.dest or Path(file_name)))
    elif args.command == "start":
        models = dict(_model_spec(spec) for spec in args.models)
        run = RunFolder(args.run_dir)
        state = start(run, args.ts_config, args.model_store, models, args.port, args.timeout)
        for name in models:
            print(f"TorchServe is running: {state['inference_url']}/predictions/{name}")
        print(
            f"  token: {state['key_file']}; logs: {run.logs}; stop it with: make stop (sam-fast-serve stop --run-dir {run.path})"
        )
    elif args.command == "stop":
        pid = stop(RunFolder(args.run_dir))
        print(f"TorchServe stopped (pid {pid})" if pid else f"no TorchServe runs from {args.run_dir}")
    elif args.command == "wait-ready":
        watched = RunFolder(args.run_dir) if args.run_dir else None
        if watched is not None:
            started = _started_from(watched)
            args.management_url, args.key_file = started["management_url"], Path(started["key_file"])
        seconds = wait_ready(watched, args.management_url, args.model, args.key_file, args.timeout)
        print(f"{args.model} READY after {seconds:.1f} s")
    elif args.command == "team":
        if args.run_dir:
            started = _started_from(RunFolder(args.run_dir))
            if RunFolder(args.run_dir).pid() is None:
                raise StartError(f"the TorchServe of {args.run_dir} is not running (make serve starts it)")
            args.inference_url, args.key_file = started["inference_url"], Path(started["key_file"])
        team.start(args.dir, args.template, args.gateway_js, args.listen, args.inference_url, args.key_file, args.nginx)
        print(f"team gateway on {args.listen} -> TorchServe {args.inference_url} (nginx, files in {args.dir})")
        print("Give each laptop the URL and the team token, e.g.:")
        print(f'  sam-fast-client photos/ --url {team.public_url(args.listen)} --token="${team.TOKEN_ENV}"')
        print("Stop it with: make stop (or sam-fast-serve team-stop)")
    elif args.command == "team-stop":
        print("team gateway stopped" if team.stop(args.dir) else f"no team gateway runs from {args.dir}")
    elif args.command == "random-checkpoint":
        print(save_random_checkpoint(args.path, args.model_type))
    elif args.command == "models":
        from sam_fast_serve.tools.docs import models_table

        print(models_table(), end="")
    elif args.command == "docs":
        from sam_fast_serve.tools.docs import update_pages

        try:
            changed = update_pages(args.directory)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for path in changed:
            print(f"rewrote {path}")
    else:
        for path in write_samples(args.directory):
            print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get(args.command)
        # A module of this package missing is a broken install, not a missing extra.
        if extra is None or (exc.name or "").partition(".")[0] == "sam_fast_serve":
            raise
        print(
            f"error: sam-fast-serve {args.command} needs the {extra!r} extra (no module named {exc.name!r} here):\n"
            f'  pip install "sam-fast-serve[{extra}]"',
            file=sys.stderr,
        )
        return 2
    except (ConfigError, StartError, team.TeamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
