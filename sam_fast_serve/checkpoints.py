"""The official SAM checkpoints, and the checks a checkpoint file must pass before it is loaded."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of Meta's published SAM checkpoints (file name, model type, URL, sha256 of the file)."""

    file_name: str
    model_type: str
    url: str
    sha256: str


_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

OFFICIAL_CHECKPOINTS: Dict[str, OfficialCheckpoint] = {
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


def official_for_model_type(model_type: str) -> OfficialCheckpoint:
    """The official checkpoint of a model type (`vit_b`, `vit_l`, `vit_h`)."""
    return next(c for c in OFFICIAL_CHECKPOINTS.values() if c.model_type == model_type)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(directory: Path, file_name: str, model_type: str) -> Path:
    """Find `file_name` in `directory` and check it.

    Returns the checkpoint's path. Raises ConfigError naming the file when it is missing (with the
    download URL and sha256 when the name is an official one), when an official file belongs to
    another model type, or when an official file's sha256 differs from the published one.
    """
    path = directory / file_name
    official: Optional[OfficialCheckpoint] = OFFICIAL_CHECKPOINTS.get(Path(file_name).name)
    if official is not None and official.model_type != model_type:
        raise ConfigError(
            f"sam_checkpoint {file_name!r} is the official {official.model_type} checkpoint, "
            f"but model_type is {model_type!r}"
        )
    if not path.is_file():
        hint = ""
        if official is not None:
            hint = f"; download it from {official.url} (sha256 {official.sha256})"
        raise ConfigError(f"sam_checkpoint {file_name!r} not found in {directory}{hint}")
    if official is not None:
        actual = file_sha256(path)
        if actual != official.sha256:
            raise ConfigError(
                f"sam_checkpoint {file_name!r} has sha256 {actual}, expected {official.sha256} "
                f"(a partial or corrupted download? get it again from {official.url})"
            )
    return path
