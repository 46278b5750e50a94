"""The wire codec: round trips, and a client decoder that refuses any pickled global."""

from __future__ import annotations

import base64
import pickle
import zlib

import pytest

from harness.files import RunsCommand
from harness.servers import REPO
from sam_fast_serve.common.wire import MAX_REQUEST_SIZE, decode_pickled, encode_json, encode_pickled, is_annotation_list

ANNOTATION = {
    "segmentation": {"size": [4, 5], "counts": "3203"},
    "area": 2,
    "bbox": [1.0, 0.0, 1.0, 2.0],
    "predicted_iou": 0.9,
    "point_coords": [[1.5, 2.5]],
    "stability_score": 0.97,
    "crop_box": [0.0, 0.0, 5.0, 4.0],
}


def test_the_request_size_limit_is_the_shipped_configs():
    properties = (REPO / "config.properties").read_text().splitlines()
    assert f"max_request_size={MAX_REQUEST_SIZE}" in properties


def test_round_trip():
    text = encode_pickled([ANNOTATION, ANNOTATION])
    assert text.isascii()
    assert decode_pickled(text) == [ANNOTATION, ANNOTATION]
    assert is_annotation_list(decode_pickled(text))


def test_json_is_the_same_payload():
    import json

    assert json.loads(encode_json([ANNOTATION])) == [ANNOTATION]


def _wrap(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw)).decode()


def test_pickle_calling_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    hostile = _wrap(pickle.dumps([RunsCommand(str(marker))]))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        decode_pickled(hostile)
    assert not marker.exists()
    # The plain unpickler would have run it: the test payload is really hostile.
    pickle.loads(zlib.decompress(base64.b64decode(hostile)))
    assert marker.exists()


@pytest.mark.parametrize("value", [pickle.dumps(eval), pickle.dumps(zlib.compress), pickle.dumps(range(3))])
def test_any_global_is_refused(value):
    with pytest.raises(pickle.UnpicklingError):
        decode_pickled(_wrap(value))


def test_garbage_and_bombs_are_value_errors():
    with pytest.raises(ValueError):
        decode_pickled("not base64 !!")
    with pytest.raises(ValueError, match="inflates past"):
        decode_pickled(_wrap(pickle.dumps(b"\0" * 10_000)), max_bytes=1000)


def test_rle_of_many_masks():
    # pycocotools' list `area` overflows past 255 masks; a 32x32 keep-all grid has 3072.
    import torch

    from sam_fast_serve.models.rle import encode_masks, rle_areas

    masks = torch.rand(300, 20, 30) > 0.5
    rles = encode_masks(masks)
    assert rle_areas(rles) == masks.sum(dim=(1, 2)).tolist()


def test_rle_encoder_short_of_memory_raises_instead_of_crashing():
    # pycocotools' C encoder does not check its mallocs; under an address-space limit a large,
    # fragmented mask made it segfault (killing a TorchServe worker). It must raise MemoryError.
    import subprocess
    import sys

    script = """
import resource, sys
import psutil, torch
from sam_fast_serve.models.rle import encode_masks
masks = torch.zeros(1, 5000, 5000, dtype=torch.bool)
masks[0, ::2] = True  # a run per pixel down every column: 25 M runs
limit = psutil.Process().memory_info().vms + 200 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
try:
    encode_masks(masks)
except MemoryError:
    sys.exit(3)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, (run.returncode, run.stderr[-500:])
