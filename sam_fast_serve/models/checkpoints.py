"""The checks a checkpoint file must pass before it is loaded, and the download of an official one
(the table of official checkpoints is models.registry's)."""

from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sam_fast_serve.common.errors import ConfigError
from sam_fast_serve.models.registry import ModelType, model_type, official_checkpoints


def load_fitting(model: Any, state: Mapping[str, Any], checkpoint: str, model_type: str) -> None:
    """Load `state` into `model` (torch.nn.Module.load_state_dict, strict). Raises ConfigError naming
    the file, the model type and the first keys that do not fit (missing, unexpected, another shape)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:3]]
        raise ConfigError(f"{checkpoint} does not fit {model_type}: {' '.join(details)[:400]}") from None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def where_to_get(file_name: str) -> str:
    """Where an official checkpoint comes from ("download it from URL (sha256 ...)"), else ""."""
    official = official_checkpoints().get(Path(file_name).name)
    if official is None:
        return ""
    if official.family.checkpoint_folder and official.url:
        repository = official.url.split(".co/")[-1]
        files = " ".join(official.family.checkpoint_files)
        return f"download its folder from {official.url} (hf download {repository} {files} --local-dir {official.file_name})"
    return f"download it from {official.url}" + (f" (sha256 {official.sha256})" if official.sha256 else "")


def check_sha256(path: Path, official: ModelType) -> None:
    """Raise ConfigError when `path` is not byte for byte the official file (where its publisher
    gives a sha256: Meta gives none for SAM 2, whose files are checked by loading them)."""
    if official.sha256 is None:
        return
    actual = file_sha256(path)
    if actual != official.sha256:
        raise ConfigError(
            f"{path.name} has sha256 {actual}, expected {official.sha256} "
            f"(a partial or corrupted download? {where_to_get(official.file_name)})"
        )


def resolve_checkpoint(directory: Path, file_name: str, model: str) -> Path:
    """Find `file_name` in `directory` and check it.

    Returns the checkpoint's path: a file, or a folder for a family whose checkpoint is one. Raises
    ConfigError naming the file when it is missing (with the download URL and sha256 when the name
    is an official one), when an official file belongs to another model type, or when an official
    file's sha256 differs from the published one.
    """
    path = directory / file_name
    folder = model_type(model).family.checkpoint_folder
    official = official_checkpoints().get(Path(file_name).name)
    if official is not None and official.name != model:
        raise ConfigError(
            f"sam_checkpoint {file_name!r} is the official {official.name} checkpoint, but model_type is {model!r}"
        )
    if not (path.is_dir() if folder else path.is_file()):
        hint = where_to_get(file_name)
        what = f" ({model}'s checkpoint is a folder)" if folder else ""
        raise ConfigError(
            f"sam_checkpoint {file_name!r} not found in {directory}{what}" + (f"; {hint}" if hint else "")
        )
    if official is not None:
        check_sha256(path, official)
    return path


def checkpoint_sha256(path: Path, files: tuple[str, ...] = ()) -> str:
    """The sha256 of a checkpoint `resolve_checkpoint` accepted: for an official file name the
    published one (`resolve_checkpoint` has just checked the file against it), else computed; a
    folder's is that of its `files`' names and sha256s (what a download adds beside them is not
    the checkpoint)."""
    official = official_checkpoints().get(path.name)
    if official is not None and official.sha256:
        return official.sha256
    if path.is_dir():
        listing = "".join(f"{name}\0{file_sha256(path / name)}\n" for name in files)
        return hashlib.sha256(listing.encode()).hexdigest()
    return file_sha256(path)


def check_folder(folder: Path, model: ModelType) -> None:
    """Raise ConfigError naming the files of `model`'s checkpoint folder that `folder` lacks."""
    files = model.family.checkpoint_files
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"{folder} is not a {model.family.title} checkpoint folder: it lacks {', '.join(missing)} (the folder "
            f"holds {', '.join(files)})"
        )


def download_checkpoint(file_name: str, dest: Path) -> Path:
    """Download the official checkpoint `file_name` to `dest`, checking its sha256.

    Raises ConfigError when the name is not an official one, the download fails (the message says
    how to use a local file instead) or the hash differs; nothing is left at `dest` then.
    """
    official = official_checkpoints().get(file_name)
    if official is None or official.url is None:
        raise ConfigError(f"{file_name!r} is not an official checkpoint; put the file at {dest}")
    if official.family.checkpoint_folder:
        raise ConfigError(
            f"{official.name}'s checkpoint is a gated folder: {where_to_get(file_name)}, then use that folder"
        )
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
    try:
        check_sha256(partial, official)
    except ConfigError:
        partial.unlink()
        raise
    partial.rename(dest)
    return dest
