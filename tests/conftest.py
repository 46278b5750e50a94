"""Shared fixtures: random-weight checkpoints, sample photos, the references equivalence tests
compare with. Tests are in folders by kind, each a marker (pytest.ini): unit (no model), integration
(models in process, and the real Redis), system (a real TorchServe, and what runs beside it).

Plumbing tests use the test architectures (test_vit, test_sam2.1_hiera: each family's code paths at
a small fraction of the FLOPs); full-size models are for equivalence and speed only.

The equivalence, prompt, store and video tests load their models, and the references they compare
with, on `device`: the CPU, or the GPU $SAM_FAST_TEST_DEVICE names (harness.devices), so that
`SAM_FAST_TEST_DEVICE=cuda:0 make test` runs them on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from harness import devices
from harness.archives import KEEP_ALL, random_checkpoint_name
from harness.files import pan_clip
from sam_fast_serve.tools.cli import save_random_checkpoint

KINDS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(item.fspath).parent.name
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device models and references load on ($SAM_FAST_TEST_DEVICE, else the CPU)."""
    return devices.device_under_test()


@pytest.fixture(scope="session")
def gpu_id(device: torch.device) -> int | None:
    """The gpu_id a service on `device` is loaded with (MaskService.load's; None on the CPU)."""
    return devices.gpu_id(device)


def _checkpoint(factory: pytest.TempPathFactory, model_type: str) -> Path:
    return save_random_checkpoint(factory.mktemp("weights") / random_checkpoint_name(model_type), model_type, seed=0)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SAM 1's test architecture (test_vit) with random weights (seed 0): for plumbing tests."""
    return _checkpoint(tmp_path_factory, "test_vit")


@pytest.fixture(scope="session")
def random_sam2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SAM 2.1's test architecture (test_sam2.1_hiera) with random weights (seed 0), in the official
    form ({"model": state_dict}): for plumbing tests."""
    return _checkpoint(tmp_path_factory, "test_sam2.1_hiera")


@pytest.fixture(scope="session")
def random_sam3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SAM 3's test architecture (test_sam3) with random weights (seed 0), a checkpoint folder in
    the published form: for plumbing tests."""
    return _checkpoint(tmp_path_factory, "test_sam3")


@pytest.fixture(scope="session")
def vit_b_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size vit_b with random weights (seed 0): for equivalence at full size."""
    return _checkpoint(tmp_path_factory, "vit_b")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return data.chelsea()


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    """harness.files.pan_clip over astronaut: the folder of JPEG frames SAM2VideoPredictor reads."""
    return pan_clip(astronaut, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def reference_sam(vit_b_checkpoint, device):
    """segment_anything's vit_b (fp32) with the random checkpoint, on `device`: the reference for equivalence."""
    from sam_fast_serve.models.registry import sam_model_fast_registry

    return sam_model_fast_registry["vit_b"](str(vit_b_checkpoint)).to(device)


@pytest.fixture(scope="session")
def fp32_service(vit_b_checkpoint, tmp_path_factory, gpu_id):
    """The mask service on that vit_b in fp32, keep-all on an 8x8 grid, loaded as the handler loads it
    (on `device`)."""
    from sam_fast_serve.server.service import MaskService

    model_dir = tmp_path_factory.mktemp("model_dir")
    (model_dir / vit_b_checkpoint.name).symlink_to(vit_b_checkpoint)
    section = {
        "model_type": "vit_b",
        "sam_checkpoint": vit_b_checkpoint.name,
        "dtype": "float32",
        "points_per_side": 8,
        "points_per_batch": 64,
        **KEEP_ALL,
    }
    return MaskService.load(section, model_dir, gpu_id=gpu_id)


@pytest.fixture(scope="session")
def reference_predictor(reference_sam, astronaut):
    """segment_anything.SamPredictor (fp32) with the astronaut photo set."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(reference_sam)
    predictor.set_image(astronaut)
    return predictor
