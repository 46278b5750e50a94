"""Every model type this server loads, the family whose code builds and serves it, and its official
checkpoint. `model_type` picks the family; nothing outside a family's folder names its classes.

Torch free: config validation and the tools read this table without the server's dependencies. A
family's code is imported on first use (`Family.code`), and the type checker holds it to the family
contract (models/family.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sam_fast_serve.common.options import AmgSettings, Sam2AmgSettings

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base
    from segment_anything.modeling import Sam

    from sam_fast_serve.models.family import FamilyCode
    from sam_fast_serve.models.sam3.build import Sam3Net


@dataclass(frozen=True)
class Family:
    """A model family: its name (its package under sam_fast_serve.models), title and the model type
    messages suggest (`example`), `code`, which imports that package (torch and the family's
    upstream code) as the family contract, its AMG settings type (`amg_settings`, common.options:
    its fields are the keys its generator takes; none: it has no automatic mask generation), the
    defaults it changes (its reference generator's), whether it has the int8 encoder (`dtype: int8`)
    and the compiled one (`compile: true`), what requests it serves: point, box and mask prompts
    (`prompts`), concepts (`concepts`: common.concepts), video (`video`: common.tracks); and, where
    its checkpoint is a folder rather than one file, that folder's files (`checkpoint_files`)."""

    name: str
    title: str
    example: str  # the model type messages suggest
    code: Callable[[], FamilyCode[Any]]
    amg_settings: type[AmgSettings] | None
    amg_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    int8: bool = False
    compile: bool = False
    prompts: bool = True
    concepts: bool = False
    video: bool = False
    # The files of a checkpoint folder (empty: the checkpoint is one file); what the archive takes of it.
    checkpoint_files: tuple[str, ...] = ()

    @property
    def checkpoint_folder(self) -> bool:
        return bool(self.checkpoint_files)

    @property
    def amg_keys(self) -> tuple[str, ...]:
        """The AMG keys its generator takes: its settings type's fields."""
        return tuple(f.name for f in dataclasses.fields(self.amg_settings)) if self.amg_settings else ()

    @property
    def automatic(self) -> bool:
        return self.amg_settings is not None


# Each family's package, checked against the contract with its own network type.
def _sam1_code() -> FamilyCode[Sam]:
    from sam_fast_serve.models import sam1

    return sam1


def _sam2_code() -> FamilyCode[SAM2Base]:
    from sam_fast_serve.models import sam2

    return sam2


def _sam3_code() -> FamilyCode[Sam3Net]:
    from sam_fast_serve.models import sam3

    return sam3


SAM1 = Family("sam1", "Segment Anything (SAM 1)", "vit_b", _sam1_code, AmgSettings, int8=True, compile=True)
SAM2 = Family(
    "sam2",
    "SAM 2 and SAM 2.1",
    "sam2.1_hiera_tiny",
    _sam2_code,
    Sam2AmgSettings,
    # SAM2AutomaticMaskGenerator's default; SAM 1's is 0.88.
    MappingProxyType({"pred_iou_thresh": 0.8}),
    video=True,
)
SAM3 = Family(
    "sam3",
    "SAM 3",
    "sam3",
    _sam3_code,
    None,
    concepts=True,
    # The facebook/sam3 form, which transformers' from_pretrained reads (the repository holds more:
    # Meta's own sam3.pt, a pickle, is neither read nor archived).
    checkpoint_files=(
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ),
)


FAMILIES = (SAM1, SAM2, SAM3)


def families_that(can: Callable[[Family], bool]) -> str:
    """The titles of the families for which `can` holds, for messages: "A" or "A and B"."""
    return " and ".join(family.title for family in FAMILIES if can(family))


def model_types_that(can: Callable[[Family], bool]) -> str:
    """For messages: the families for which `can` holds, each with one of its model types, e.g.
    "SAM 2 and SAM 2.1 (model_type sam2.1_hiera_tiny, ...)"."""
    named = []
    for family in FAMILIES:
        if can(family):
            named.append(f"{family.title} (model_type {family.example}, ...)")
    return " or ".join(named)


@dataclass(frozen=True)
class ModelType:
    """One model type: its family, the official checkpoint (file name, URL, sha256 where the
    publisher gives one), parameters in millions, and what the family needs to build it
    (`build`: segment_anything's registry name, SAM 2's Hydra config, or SAM 3's architecture).
    A family with `checkpoint_folder` names its checkpoint folder in `file_name`."""

    name: str
    family: Family
    file_name: str
    url: str | None
    sha256: str | None
    parameters_m: float
    build: str
    # A random-weight test architecture: the family's code paths at a small fraction of the FLOPs.
    test_only: bool = False
    # The side of the square the model sees an image at, and of its low-resolution mask logits (an
    # answer's `low_res_logits`, a `mask_input`): four per patch of its image embedding.
    input_side: int = 1024
    mask_input_side: int = 256


_SAM1_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# Meta's SAM 2 (July 2024) and SAM 2.1 (September 2024) checkpoints; no sha256 is published for them.
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
# Meta's SAM 3 (November 2025), a gated Hugging Face repository: the folder is downloaded whole
# (`hf download facebook/sam3 --local-dir sam3`) once its licence is accepted.
SAM3_URL = "https://huggingface.co/facebook/sam3"


def _sam2(version: str, size: str, short: str, parameters_m: float) -> ModelType:
    name = f"{version}_hiera_{size}"
    base = _SAM2_URL if version == "sam2" else _SAM21_URL
    return ModelType(
        name,
        SAM2,
        f"{name}.pt",
        base + f"{name}.pt",
        None,
        parameters_m,
        f"configs/{version}/{version}_hiera_{short}.yaml",
    )


MODEL_TYPES: dict[str, ModelType] = {
    m.name: m
    for m in (
        ModelType(
            "vit_b",
            SAM1,
            "sam_vit_b_01ec64.pth",
            _SAM1_URL + "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            93.7,
            "vit_b",
        ),
        ModelType(
            "vit_l",
            SAM1,
            "sam_vit_l_0b3195.pth",
            _SAM1_URL + "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            312.3,
            "vit_l",
        ),
        ModelType(
            "vit_h",
            SAM1,
            "sam_vit_h_4b8939.pth",
            _SAM1_URL + "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            641.1,
            "vit_h",
        ),
        _sam2("sam2", "tiny", "t", 38.9),
        _sam2("sam2", "small", "s", 46.0),
        _sam2("sam2", "base_plus", "b+", 80.8),
        _sam2("sam2", "large", "l", 224.4),
        _sam2("sam2.1", "tiny", "t", 39.0),
        _sam2("sam2.1", "small", "s", 46.1),
        _sam2("sam2.1", "base_plus", "b+", 80.9),
        _sam2("sam2.1", "large", "l", 224.4),
        ModelType("sam3", SAM3, "sam3", SAM3_URL, None, 859.9, "sam3", input_side=1008, mask_input_side=288),
        ModelType("test_vit", SAM1, "test_vit.pth", None, None, 5.1, "test_vit", test_only=True),
        ModelType(
            "test_sam2.1_hiera",
            SAM2,
            "test_sam2.1_hiera.pt",
            None,
            None,
            7.7,
            "configs/sam2.1/sam2.1_hiera_t.yaml",
            test_only=True,
        ),
        ModelType(
            "test_sam3",
            SAM3,
            "test_sam3",
            None,
            None,
            0.8,
            "test_sam3",
            test_only=True,
            input_side=336,
            mask_input_side=96,
        ),
    )
}


def model_type(name: str) -> ModelType:
    """The model type called `name` (KeyError for an unknown one: config validation names them)."""
    return MODEL_TYPES[name]


def official_checkpoints() -> dict[str, ModelType]:
    """Model types by their official checkpoint's file name (the test architectures have none)."""
    return {m.file_name: m for m in MODEL_TYPES.values() if m.url is not None}


def _builder(name: str) -> Callable[[str | None], Any]:
    def build(checkpoint: str | None = None) -> Any:
        """Build the model (in eval mode, on the CPU, float32); load `checkpoint` with weights_only=True if given."""
        return MODEL_TYPES[name].family.code().build(MODEL_TYPES[name], checkpoint)

    return build


# model_type -> a function of a checkpoint path (or None: random weights) that builds the model.
sam_model_fast_registry: dict[str, Callable[[str | None], Any]] = {name: _builder(name) for name in MODEL_TYPES}
