"""Objects followed through frames (models.sam2.video) equal SAM 2's own SAM2VideoPredictor on the
same frames and prompts, while holding only the frames and outputs the predictor can still read.

SAM 2's path reads a folder of JPEG files; ours reads the same files' pixels one frame at a time,
with the memory attention the tracker uses (models.sam2.memory). The test architecture of SAM 2.1 with random weights: logits are compared, not only masks, since
random weights make masks of little shape."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from harness.components import sam2_labelled_by_scipy
from harness.files import CLIP_FRAMES as FRAMES
from sam_fast_serve.common.tracks import parse_track_request
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.attention import faster_hiera
from sam_fast_serve.models.sam2.build import build_video
from sam_fast_serve.models.sam2.memory import cheaper_memory_attention
from sam_fast_serve.models.sam2.positions import cached_positions
from sam_fast_serve.models.sam2.tracker import Sam2Tracker
from sam_fast_serve.models.sam2.video import CACHED_FRAMES, LazyFrames, init_state, propagate, reach

PROMPTED = (0, 24)  # the frames with prompts; tracking runs forward from 0, then back from 24


@pytest.fixture(scope="module")
def predictor(random_sam2_checkpoint, device):
    """The video predictor on `device`, its object pointers cut from 16 frames to 4 so that its reach
    (8 frames, its memory's) leaves frames out of reach within FRAMES, both sides of a prompted frame."""
    video = build_video(model_type("test_sam2.1_hiera"), str(random_sam2_checkpoint)).to(device)
    video.max_obj_ptrs_in_encoder = 4
    assert reach(video) == 8
    return video


@pytest.fixture(scope="module")
def ours(predictor, random_sam2_checkpoint, device):
    """The same predictor as the tracker makes it: its attention (every Hiera block's, every
    memory layer's self- and cross-attention) and its position encodings; then on `device`, as the
    tracker moves it (tracker.video_predictor)."""
    video = build_video(model_type("test_sam2.1_hiera"), str(random_sam2_checkpoint))
    video.max_obj_ptrs_in_encoder = 4
    assert faster_hiera(video) == len(video.image_encoder.trunk.blocks) >= 1
    assert cached_positions(video) == 2  # the image encoder's and the memory encoder's
    assert cheaper_memory_attention(video) == 2 * len(video.memory_attention.layers) >= 2
    return video.to(device)


def prompt(predictor, state) -> None:
    predictor.add_new_points_or_box(state, frame_idx=PROMPTED[0], obj_id=1, points=[[80, 60]], labels=[1])
    predictor.add_new_points_or_box(state, frame_idx=PROMPTED[1], obj_id=7, box=[20, 20, 100, 90])


def passes(run, state):
    """Forward from the first prompted frame, then backward from the second (which reads the
    forward pass's outputs after it)."""
    yield from run(state, None, None, False)
    yield from run(state, PROMPTED[1], None, True)


def reference_run(predictor, clip: Path) -> dict[tuple[int, int], torch.Tensor]:
    state = predictor.init_state(str(clip))
    prompt(predictor, state)
    logits = {}
    for frame, ids, masks in passes(predictor.propagate_in_video, state):
        for obj, mask in zip(ids, masks[:, 0], strict=True):
            logits[frame, obj] = mask.clone()
    return logits


def test_tracking_equals_sam2_video_predictor_with_bounded_state(predictor, ours, clip):
    expected = reference_run(predictor, clip)

    def read(i: int) -> np.ndarray:
        return np.array(Image.open(clip / f"{i}.jpg").convert("RGB"))

    frames = LazyFrames(read, FRAMES, ours.image_size)
    state = init_state(ours, frames)
    prompt(ours, state)
    tracked_logits, forgotten = {}, set()

    def run(state, start, count, reverse):
        return propagate(ours, state, start, count, reverse)

    for tracked in passes(run, state):
        assert tracked.mask_logits.shape == (2, 120, 160) and tracked.object_scores.shape == (2,)
        for obj, logits in zip(tracked.object_ids, tracked.mask_logits, strict=True):
            tracked_logits[tracked.frame, obj] = logits.clone()
        kept = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
        forgotten |= {frame for frame, _ in tracked_logits if frame not in kept and frame not in PROMPTED}
        assert len(frames._cache) <= CACHED_FRAMES
    assert tracked_logits.keys() == expected.keys()
    assert {frame for frame, _ in tracked_logits} == set(range(FRAMES))
    # Forgotten on the way: the frames out of reach (8) of the one tracked and of both prompted ones.
    assert set(range(9, 16)) <= forgotten and not forgotten & set(range(16, 33))
    for key, logits in expected.items():
        assert torch.allclose(tracked_logits[key], logits, atol=1e-4), key
        mask, theirs = tracked_logits[key] > 0, logits > 0
        union = (mask | theirs).sum().item()
        assert union == 0 or (mask & theirs).sum().item() / union >= 0.99, key


def test_every_frame_computes_in_the_trackers_dtype(ours, clip):
    """Autocast holds on every frame tracked, not only until the first answer: entered inside an
    inference-mode generator, it was gone after the first yield and later frames ran in float32."""
    request = parse_track_request({"prompts": [{"frame": 0, "object": 1, "points": [[80, 60]]}]}, 4, (120, 160))
    dtypes: list[torch.dtype] = []
    hook = ours.memory_attention.layers[0].linear1.register_forward_hook(lambda *args: dtypes.append(args[2].dtype))
    try:
        tracker = Sam2Tracker(ours, torch.bfloat16)
        read = lambda i: np.array(Image.open(clip / f"{i}.jpg").convert("RGB"))  # noqa: E731
        answered = [frame for frame, _ in tracker.track(read, 4, request)]
    finally:
        hook.remove()
    assert answered == [0, 1, 2, 3]
    # The memory attention runs on each frame after the prompted one.
    assert dtypes == [torch.bfloat16] * 3


def forward_masks(predictor, clip: Path) -> dict[tuple[int, int], np.ndarray]:
    state = predictor.init_state(str(clip))
    prompt(predictor, state)
    with torch.inference_mode():
        return {
            (frame, obj): mask.cpu().numpy() > 0
            for frame, ids, masks in predictor.propagate_in_video(state)
            for obj, mask in zip(ids, masks[:, 0], strict=True)
        }


def test_tracker_fills_holes_as_sam2_does_with_its_extension(predictor, ours, clip):
    """SAM 2 without `_C` skips hole filling (fill_hole_area 8) with a warning; the tracker fills
    the holes, equal to SAM 2's own filling on components labelled by scipy."""
    assert predictor.fill_hole_area == 8
    with pytest.warns(UserWarning, match="Skipping the post-processing"):
        unfilled = forward_masks(predictor, clip)
    with sam2_labelled_by_scipy():
        filled = forward_masks(predictor, clip)
    request = parse_track_request(
        {
            "prompts": [
                {"frame": 0, "object": 1, "points": [[80, 60]]},
                {"frame": 24, "object": 7, "boxes": [[20, 20, 100, 90]]},
            ]
        },
        FRAMES,
        (120, 160),
    )
    read = lambda i: np.array(Image.open(clip / f"{i}.jpg").convert("RGB"))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracked = {
            (frame, record["object"]): mask_utils.decode(dict(record["segmentation"])).astype(bool)
            for frame, records in Sam2Tracker(ours, torch.float32).track(read, FRAMES, request)
            for record in records
        }
    assert not [w for w in caught if "Skipping the post-processing" in str(w.message)]
    assert tracked.keys() == filled.keys()
    differs = [key for key in filled if (filled[key] != unfilled[key]).any()]
    assert differs, "no frame had a hole to fill: the test cannot tell filling from skipping"
    for key, mask in filled.items():
        union = (mask | tracked[key]).sum()
        assert union == 0 or (mask & tracked[key]).sum() / union >= 0.99, key
    for key in differs:
        assert (tracked[key] == filled[key]).sum() > (tracked[key] == unfilled[key]).sum(), key


def test_frames_of_another_size_are_refused(predictor):
    sizes = {0: (120, 160), 1: (120, 160), 2: (60, 80)}
    frames = LazyFrames(lambda i: np.zeros((*sizes[i], 3), np.uint8), 3, predictor.image_size)
    frames[1]
    with pytest.raises(ValueError, match="frame 2 is 80x60, frame 0 160x120"):
        frames[2]
    with pytest.raises(IndexError):
        frames[3]
