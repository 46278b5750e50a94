"""The official SAM checkpoints, the checks a checkpoint file must pass before it is loaded, and
their download."""

from __future__ import annotations

import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of Meta's published SAM checkpoints (file name, model type, URL, sha256 of the file)."""

    file_name: str
    model_type: str
    url: str
    sha256: str


_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    c.file_name: c
    for c in (
        OfficialCheckpoint(
            "sam_vit_b_01ec64.pth",
            "vit_b",
            _BASE_URL + "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        ),
        OfficialCheckpoint(
            "sam_vit_l_0b3195.pth",
            "vit_l",
            _BASE_URL + "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        ),
        OfficialCheckpoint(
            "sam_vit_h_4b8939.pth",
            "vit_h",
            _BASE_URL + "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        ),
    )
}

MODEL_TYPES = tuple(c.model_type for c in OFFICIAL_CHECKPOINTS.values())


def official_for_model_type(model_type: str) -> OfficialCheckpoint:
    """The official checkpoint of a model type (one of MODEL_TYPES)."""
    return next(c for c in OFFICIAL_CHECKPOINTS.values() if c.model_type == model_type)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def where_to_get(file_name: str) -> str:
    """Where an official checkpoint comes from ("download it from URL (sha256 ...)"), else ""."""
    official = OFFICIAL_CHECKPOINTS.get(Path(file_name).name)
    return "" if official is None else f"download it from {official.url} (sha256 {official.sha256})"


def check_sha256(path: Path, official: OfficialCheckpoint) -> None:
    """Raise ConfigError when `path` is not byte for byte the official file."""
    actual = file_sha256(path)
    if actual != official.sha256:
        raise ConfigError(
            f"{path.name} has sha256 {actual}, expected {official.sha256} "
            f"(a partial or corrupted download? {where_to_get(official.file_name)})"
        )


def resolve_checkpoint(directory: Path, file_name: str, model_type: str) -> Path:
    """Find `file_name` in `directory` and check it.

    Returns the checkpoint's path. Raises ConfigError naming the file when it is missing (with the
    download URL and sha256 when the name is an official one), when an official file belongs to
    another model type, or when an official file's sha256 differs from the published one.
    """
    path = directory / file_name
    official = OFFICIAL_CHECKPOINTS.get(Path(file_name).name)
    if official is not None and official.model_type != model_type:
        raise ConfigError(
            f"sam_checkpoint {file_name!r} is the official {official.model_type} checkpoint, "
            f"but model_type is {model_type!r}"
        )
    if not path.is_file():
        hint = where_to_get(file_name)
        raise ConfigError(f"sam_checkpoint {file_name!r} not found in {directory}" + (f"; {hint}" if hint else ""))
    if official is not None:
        check_sha256(path, official)
    return path


def checkpoint_sha256(path: Path) -> str:
    """The sha256 of a checkpoint `resolve_checkpoint` accepted: for an official file name the
    published one (`resolve_checkpoint` has just checked the file against it), else computed."""
    official = OFFICIAL_CHECKPOINTS.get(path.name)
    return official.sha256 if official is not None else file_sha256(path)


def download_checkpoint(file_name: str, dest: Path) -> Path:
    """Download the official checkpoint `file_name` to `dest`, checking its sha256.

    Raises ConfigError when the name is not an official one, the download fails (the message says
    how to use a local file instead) or the hash differs; nothing is left at `dest` then.
    """
    official = OFFICIAL_CHECKPOINTS.get(file_name)
    if official is None:
        raise ConfigError(f"{file_name!r} is not an official checkpoint; put the file at {dest}")
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
