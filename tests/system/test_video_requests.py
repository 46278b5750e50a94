"""Video requests through a real TorchServe (SAM 2.1's test architecture, fp32): a time-lapse TIFF
and an MP4 tracked a frame at a time, each frame's record its own HTTP chunk, equal to SAM 2's
SAM2VideoPredictor on the same frames; the limits, bad files and bad prompts refused with their
reason while the worker goes on; a request the client cuts short leaves nothing open behind it."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import psutil
import pytest
import requests
import tifffile
import torch
from pycocotools import mask as mask_utils

from harness.archives import run_client, running_server
from harness.components import sam2_labelled_by_scipy
from harness.files import clip_pixels, encode, tiff, video_file, video_frames
from sam_fast_serve.client.video import label_page
from sam_fast_serve.common.wire import decode_pickled
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam2.build import build_video

FRAMES = 12
PROMPTS = [
    {"frame": 0, "object": 1, "points": [[80, 60]], "labels": [1]},
    {"frame": 6, "object": 7, "boxes": [[20, 20, 100, 90]]},
]
LIMITS = {"max_video_frames": 20, "max_frame_pixels": 200 * 150}


@pytest.fixture(scope="module")
def sam2_server(tmp_path_factory, random_sam2_checkpoint):
    handler = {"dtype": "float32", **LIMITS}
    with running_server(tmp_path_factory.mktemp("torchserve"), random_sam2_checkpoint, handler=handler) as ts:
        yield ts


@pytest.fixture(scope="module")
def pixels(clip) -> np.ndarray:
    return clip_pixels(clip, FRAMES)


def post(server, *, json_body=None, accept="application/json", **kwargs):
    headers = {**server.auth(), **({"Accept": accept} if accept else {})}
    return requests.post(
        f"{server.inference_url}/predictions/sam-fast", json=json_body, headers=headers, timeout=300, **kwargs
    )


def video_request(video: bytes, **options) -> dict:
    return {"video": base64.b64encode(video).decode(), "prompts": PROMPTS, **options}


def reference_masks(checkpoint, clip, tmp_path) -> dict[tuple[int, int], np.ndarray]:
    """SAM2VideoPredictor on the first FRAMES JPEG files of the clip, tracked as direction "both"
    tracks: forward from the first prompted frame (frame 0, so the backward pass adds nothing); its
    holes filled as with its `_C` extension, as the server fills them."""
    for i in range(FRAMES):
        shutil.copy(clip / f"{i}.jpg", tmp_path / f"{i}.jpg")
    predictor = build_video(model_type("test_sam2.1_hiera"), str(checkpoint))
    masks = {}
    with torch.inference_mode(), sam2_labelled_by_scipy():
        state = predictor.init_state(str(tmp_path))
        for prompt in PROMPTS:
            box = prompt["boxes"][0] if "boxes" in prompt else None
            predictor.add_new_points_or_box(
                state,
                prompt["frame"],
                prompt["object"],
                points=prompt.get("points"),
                labels=prompt.get("labels"),
                box=box,
            )
        for frame, ids, logits in predictor.propagate_in_video(state):
            for obj, mask in zip(ids, logits[:, 0] > 0, strict=True):
                masks[frame, obj] = mask.numpy()
    return masks


def test_a_tiff_stack_streams_a_chunk_a_frame_equal_to_sam2_video_predictor(
    sam2_server, pixels, random_sam2_checkpoint, clip, tmp_path
):
    reply = post(sam2_server, json_body=video_request(tiff(pixels)), stream=True)
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/json"
    chunks = [chunk.decode() for chunk in reply.raw.read_chunked(decode_content=True) if chunk]
    # What is tracked, then each frame's record a chunk, sent when it is computed; the summary ends it.
    assert len(chunks) == FRAMES + 2 and all(chunk.count("\n") == 1 for chunk in chunks)
    header, *records, summary = [json.loads(chunk) for chunk in chunks]
    assert header == {"frames": FRAMES, "objects": [1, 7]}
    assert summary == {"done": True, "frames": FRAMES, "objects": [1, 7]}
    assert [record["frame"] for record in records] == list(range(FRAMES))
    expected = reference_masks(random_sam2_checkpoint, clip, tmp_path)
    for record in records:
        assert [obj["object"] for obj in record["objects"]] == [1, 7]
        for obj in record["objects"]:
            mask = mask_utils.decode(obj["segmentation"]).astype(bool)
            theirs = expected[record["frame"], obj["object"]]
            assert obj["area"] == mask.sum() and 0.0 <= obj["score"] <= 1.0
            union = (mask | theirs).sum()
            assert union == 0 or (mask & theirs).sum() / union >= 0.99, (record["frame"], obj["object"])


def test_an_mp4_in_a_form_answers_as_the_tiff_of_its_decoded_frames(sam2_server, pixels):
    """The default answer format (pickled lines), a multipart form with a "video" file part, and
    the frame range and stride: the same records as for the frames OpenCV decodes, sent as a TIFF."""
    mp4 = video_file(pixels, ".mp4", "mp4v")
    options = {"frame_range": [0, 10], "frame_stride": 2, "direction": "forward"}
    form = {"prompts": json.dumps(PROMPTS[:1]), **{key: json.dumps(value) for key, value in options.items()}}
    reply = post(sam2_server, accept=None, files={"video": ("clip.mp4", mp4)}, data=form)
    assert reply.status_code == 200, reply.text[:300]
    ours = [decode_pickled(line) for line in reply.text.splitlines()]
    document = {"video": base64.b64encode(tiff(video_frames(mp4, ".mp4"))).decode(), "prompts": PROMPTS[:1], **options}
    same = post(sam2_server, accept=None, json_body=document)
    assert ours == [decode_pickled(line) for line in same.text.splitlines()]
    assert [record.get("frame") for record in ours] == [None, 0, 2, 4, 6, 8, 10, None]


def test_segment_everything_on_a_frame_then_follow_it(sam2_server, pixels):
    """No prompts: automatic mask generation on `automatic_frame` (a 1-point grid: its 3 masks,
    nothing filtered), each mask an object (ids 1, 2, 3), tracked both ways from there."""
    document = {"video": base64.b64encode(tiff(pixels)).decode(), "automatic_frame": 4, "points_per_side": 1}
    reply = post(sam2_server, json_body=document)
    assert reply.status_code == 200, reply.text[:300]
    header, *records, summary = [json.loads(line) for line in reply.text.splitlines()]
    assert header == {"frames": FRAMES, "objects": [1, 2, 3]} and summary["objects"] == [1, 2, 3]
    assert [record["frame"] for record in records] == [*range(4, FRAMES), 3, 2, 1, 0]
    assert all([obj["object"] for obj in record["objects"]] == [1, 2, 3] for record in records)
    kept_none = post(sam2_server, json_body={**document, "pred_iou_thresh": 1.0})
    assert kept_none.status_code == 422 and "kept no mask on frame 4" in kept_none.json()["message"]


def _corrupt_mp4(pixels):
    return b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8


def _truncated_avi(pixels):
    avi = video_file(pixels, ".avi", "MJPG")
    return avi[: len(avi) * 2 // 3]


FAULTS = {
    "corrupt mp4": (_corrupt_mp4, {}, 400, "cannot be opened"),
    "truncated avi": (_truncated_avi, {}, 400, f"of the {FRAMES} frames its header gives"),
    "not a video": (lambda pixels: encode(pixels[0]), {}, 415, "MP4, MOV, WebM/MKV, AVI or a multi-page TIFF"),
    "frame past the end": (
        lambda pixels: tiff(pixels),
        {"prompts": [{"frame": FRAMES, "object": 1, "points": [[5, 5]]}]},
        422,
        f"frame {FRAMES}, which is not tracked",
    ),
    "AMG options with prompts": (
        lambda pixels: tiff(pixels),
        {"points_per_side": 4},
        422,
        "AMG options apply to a video request without 'prompts'",
    ),
    "an object with no prompt": (
        lambda pixels: tiff(pixels),
        {"prompts": [{"frame": 0, "object": 3}]},
        422,
        "needs 'points', 'boxes' or 'mask'",
    ),
    "too many frames": (
        lambda pixels: tiff(np.concatenate([pixels, pixels])[:21]),
        {},
        413,
        "the TIFF has 21 frames; at most 20",
    ),
    "frames too large": (
        lambda pixels: tiff(np.zeros((2, 200, 300, 3), np.uint8)),
        {},
        413,
        "300x200 = 60000 pixels; the limit is 30000 pixels (handler key max_frame_pixels)",
    ),
    "a picture answer": (lambda pixels: tiff(pixels), {"accept": "image/png"}, 406, "a record a frame"),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_bad_videos_and_prompts_get_their_reason_and_the_worker_goes_on(sam2_server, pixels, fault):
    make, options, status, reason = FAULTS[fault]
    pid = sam2_server.worker_pids()[0]
    options = dict(options)
    accept = options.pop("accept", "application/json")
    reply = post(sam2_server, json_body=video_request(make(pixels), **options), accept=accept)
    assert reply.status_code == status and reason in reply.json()["message"], reply.text[:300]
    assert sam2_server.worker_pids()[0] == pid


def test_a_still_image_model_refuses_video(server, pixels):
    reply = post(server, json_body=video_request(tiff(pixels[:2])))
    assert reply.status_code == 400 and "still-image model" in reply.json()["message"]


def test_a_request_cut_short_leaves_nothing_open(sam2_server, pixels):
    """The client reads the first frame and hangs up: TorchServe does not tell the worker, which
    tracks to the end, then closes the frames' files; the next request is answered."""
    worker = psutil.Process(int(sam2_server.worker_pids()[0]))
    before = {f.path for f in worker.open_files()}
    mp4 = video_file(pixels, ".mp4", "mp4v")
    with post(sam2_server, json_body=video_request(mp4), stream=True) as reply:
        chunks = reply.raw.read_chunked(decode_content=True)
        assert json.loads(next(chunks)) == {"frames": FRAMES, "objects": [1, 7]}
        assert json.loads(next(chunks))["frame"] == 0
    again = post(sam2_server, json_body=video_request(tiff(pixels[:7])))
    assert again.status_code == 200 and again.text.splitlines()[-1] == '{"done":true,"frames":7,"objects":[1,7]}'
    assert {f.path for f in worker.open_files()} == before


def test_the_client_tracks_videos_and_stacks_to_masklets_and_label_stacks(sam2_server, pixels, tmp_path):
    """`sam-fast-client clip.mp4 --point X,Y --frame 0`, a TIFF stack and a corrupt video in one
    run: the two good files each give their masklets and a label stack whose pages are the
    masklets' masks, the bad one is one failure, the run goes on; then a --prompts file."""
    (tmp_path / "clip.mp4").write_bytes(video_file(pixels, ".mp4", "mp4v"))
    (tmp_path / "stack.tif").write_bytes(tiff(pixels))
    (tmp_path / "broken.avi").write_bytes(_truncated_avi(pixels))
    out = tmp_path / "out"
    inputs = [tmp_path / name for name in ("clip.mp4", "broken.avi", "stack.tif")]
    ran = run_client(*inputs, "--point", "80,60", "--frame", "0", "--object", "5", "--out", out, server=sam2_server)
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert "broken.avi: FAILED: HTTP 400" in ran.stderr and "2 of 3 videos tracked, 1 failed" in ran.stdout
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["status"] == 400 and "frames its header gives" in failure["reason"]
    assert not (out / "broken.masklets.json").exists() and not (out / "broken.labels.tif").exists()
    for name in ("clip", "stack"):
        masklets = json.loads((out / f"{name}.masklets.json").read_text())
        assert masklets["objects"] == [5] and [r["frame"] for r in masklets["frames"]] == list(range(FRAMES))
        stack = tifffile.imread(out / f"{name}.labels.tif")
        assert stack.shape == (FRAMES, *pixels.shape[1:3]) and stack.dtype == np.uint16
        for page, record in zip(stack, masklets["frames"], strict=True):
            (obj,) = record["objects"]
            assert np.array_equal(page == 5, mask_utils.decode(obj["segmentation"]).astype(bool))
            assert set(np.unique(page)) <= {0, 5}

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    command = (tmp_path / "stack.tif", "--frame", "0", "--prompts", prompts, "--out", out, "--wire", "json")
    ran = run_client(*command, "--overlay-video", server=sam2_server)
    assert ran.returncode == 0, ran.stderr[-2000:]
    masklets = json.loads((out / "stack.masklets.json").read_text())
    assert masklets["objects"] == [1, 7] and len(masklets["frames"]) == FRAMES
    # The overlay: every frame tracked, in order, the objects' pixels tinted and the others not.
    overlay = video_frames((out / "stack.overlay.mp4").read_bytes(), ".mp4")
    assert overlay.shape == pixels.shape
    labels = np.stack([label_page(record, pixels.shape[1:3]) for record in masklets["frames"]])
    change = np.abs(overlay.astype(int) - pixels.astype(int)).sum(axis=-1)
    assert labels.any() and change[labels > 0].mean() > 3 * change[labels == 0].mean()
