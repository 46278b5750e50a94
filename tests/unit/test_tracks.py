"""A video request's options checked against its video (common.tracks), and docs/video.md naming each."""

from __future__ import annotations

import pytest

from harness.servers import REPO
from sam_fast_serve.common.errors import InvalidOption
from sam_fast_serve.common.tracks import PROMPT_KEYS, TRACK_OPTIONS, parse_track_request

SIZE = (120, 160)
POINT = {"frame": 4, "object": 1, "points": [[10, 20]]}


def test_frames_tracked_and_prompts_indexed_among_them():
    request = parse_track_request(
        {
            "prompts": [POINT, {"frame": 10, "object": 2, "boxes": [[1, 2, 30, 40]]}],
            "frame_range": [2, 11],
            "frame_stride": 2,
        },
        count=12,
        size=SIZE,
    )
    assert request.frames == range(2, 12, 2) and request.direction == "both"
    first, second = request.prompts
    assert (first.frame, first.object, second.frame, second.object) == (1, 1, 4, 2)
    assert first.prompts.labels.tolist() == [1] and second.prompts.boxes.tolist() == [[1, 2, 30, 40]]


def test_without_prompts_automatic_mask_generation_finds_the_objects():
    request = parse_track_request({"frame_range": [3, 9], "frame_stride": 3}, 10, SIZE)
    assert request.prompts == () and request.automatic == 0
    request = parse_track_request({"automatic_frame": 6, "frame_range": [3, 9], "frame_stride": 3}, 10, SIZE)
    assert request.automatic == 1
    masks = [{"size": list(SIZE), "counts": "a"}, {"size": list(SIZE), "counts": "b"}]
    followed = request.with_masks(masks)
    assert [(p.frame, p.object, p.mask) for p in followed.prompts] == [(1, 1, masks[0]), (1, 2, masks[1])]
    assert followed.automatic is None and followed.frames == request.frames
    with pytest.raises(InvalidOption, match="frame 5, which is not tracked"):
        parse_track_request({"automatic_frame": 5, "frame_range": [3, 9], "frame_stride": 3}, 10, SIZE)
    with pytest.raises(InvalidOption, match="apply to a video request without 'prompts'"):
        parse_track_request({"prompts": [POINT]}, 10, SIZE, automatic=True)


def test_a_mask_prompt_is_a_coco_rle_of_the_frame_size():
    mask = {"size": list(SIZE), "counts": "abc"}
    (prompt,) = parse_track_request({"prompts": [{"frame": 0, "object": 3, "mask": mask}]}, 1, SIZE).prompts
    assert prompt.mask == mask and prompt.prompts is None
    with pytest.raises(InvalidOption, match=r"COCO RLE of the frame's size, \{'size': \[120, 160\]"):
        parse_track_request({"prompts": [{"frame": 0, "object": 3, "mask": {**mask, "size": [60, 80]}}]}, 1, SIZE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompts": []}, "'prompts' must be a list like"),
        ({"prompts": [POINT], "points_per_side": 8}, "'points_per_side' do not apply to a video request"),
        ({"prompts": [POINT], "direction": "sideways"}, "'direction' must be one of forward, backward, both"),
        ({"prompts": [POINT], "frame_range": [5, 3]}, "'frame_range' last must be an integer from 5 to 9"),
        ({"prompts": [POINT], "frame_stride": 0}, "'frame_stride' must be an integer from 1 to 10"),
        (
            {"prompts": [POINT], "frame_stride": 3},
            "frame 4, which is not tracked: the frames tracked are 0 to 9 every 3",
        ),
        ({"prompts": [{**POINT, "colour": 1}]}, "prompt 0 has unknown key(s) 'colour'"),
        ({"prompts": [{"frame": 0, "points": [[1, 1]]}]}, "needs 'frame' (a frame number) and 'object'"),
        ({"prompts": [{**POINT, "points": [[500, 1]]}]}, "prompt 0: 'points' has (500, 1) outside the 160x120 image"),
        ({"prompts": [{**POINT, "boxes": [[0, 0, 5, 5], [1, 1, 9, 9]]}]}, "2 boxes: an object takes one box a frame"),
        ({"prompts": [POINT, {**POINT, "points": [[1, 1]]}]}, "object 1 has two prompts on frame 4"),
        ({"prompts": [{**POINT, "mask": {}}]}, "a mask prompt stands alone"),
    ],
)
def test_bad_options_are_refused_with_their_reason(options, message):
    with pytest.raises(InvalidOption) as refused:
        parse_track_request(options, count=10, size=SIZE)
    assert message in refused.value.message


def test_the_video_page_names_every_option_and_prompt_key():
    page = (REPO / "docs" / "video.md").read_text()
    assert [key for key in (*TRACK_OPTIONS, *PROMPT_KEYS) if f"`{key}`" not in page] == []
