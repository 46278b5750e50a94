"""Prompt files: one JSON line per image, its prompts checked with the server's rules, a bad line
named by its number; the names of the result files they give."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from sam_fast_serve.client.inputs import Prompts, clashes, read_prompt_file


def write_lines(path: Path, *entries: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


def test_a_prompt_file_names_its_images_and_their_prompts(tmp_path):
    outside = tmp_path / "elsewhere" / "far.tif"
    prompts = write_lines(
        tmp_path / "set" / "prompts.jsonl",
        {"file": "cells/a.png", "points": [[10, 20], [30, 40]], "labels": [1, 0]},
        "",
        {"file": "b.jpg", "boxes": [[1, 2, 30, 40]]},
        {"file": str(outside), "points": [[5, 5]], "boxes": [[0, 0, 9, 9], [1, 1, 8, 8]]},
        {"file": "../up.png", "points": [[1, 1]]},
    )
    images = read_prompt_file(prompts)
    folder = tmp_path / "set"
    assert [(i.id, i.path, i.name) for i in images] == [
        (1, folder / "cells" / "a.png", PurePosixPath("cells/a.png")),
        (2, folder / "b.jpg", PurePosixPath("b.jpg")),
        (3, outside, PurePosixPath("far.tif")),
        (4, folder / ".." / "up.png", PurePosixPath("up.png")),
    ]
    assert images[0].prompts == Prompts([[10, 20], [30, 40]], [1, 0], [])
    assert images[1].prompts == Prompts([], [], [[1, 2, 30, 40]])
    assert images[2].prompts.fields() == {"points": [[5, 5]], "labels": [1], "boxes": [[0, 0, 9, 9], [1, 1, 8, 8]]}
    assert images[0].result(tmp_path / "out") == tmp_path / "out" / "cells" / "a.json"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        (json.dumps(["a.png"]), 'a JSON object with a "file" path'),
        (json.dumps({"points": [[1, 1]]}), 'a JSON object with a "file" path'),
        (json.dumps({"file": "a.png", "point": [[1, 1]]}), "unknown key(s) 'point'; known keys: file, points"),
        (json.dumps({"file": "a.png"}), "a prompted request needs 'points', 'boxes'"),
        (json.dumps({"file": "a.png", "points": [[1, 1]], "labels": [1, 0]}), "'labels' must be a list of 1 values"),
        (json.dumps({"file": "a.png", "points": [1, 1]}), "'points' must be a non-empty list like [[x, y], ...]"),
        (json.dumps({"file": "a.png", "boxes": [[9, 9, 1, 1]]}), "each box must be [x0, y0, x1, y1] with x0 < x1"),
        (json.dumps({"file": "a.png", "points": [[i, i] for i in range(65)]}), "at most 64 are allowed"),
        (json.dumps({"file": ".", "points": [[1, 1]]}), "names no file"),
    ],
)
def test_a_bad_line_is_named_with_what_is_wrong(tmp_path, line, message):
    prompts = write_lines(tmp_path / "p.jsonl", {"file": "ok.png", "points": [[1, 1]]}, line)
    with pytest.raises(ValueError) as refused:
        read_prompt_file(prompts)
    assert str(refused.value).startswith(f"{prompts}:2: ") and message in str(refused.value)


def test_an_empty_prompt_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no line names an image"):
        read_prompt_file(write_lines(tmp_path / "p.jsonl", ""))


def test_two_lines_for_one_image_clash(tmp_path):
    prompts = write_lines(
        tmp_path / "p.jsonl", {"file": "a.png", "points": [[1, 1]]}, {"file": "./a.png", "boxes": [[0, 0, 2, 2]]}
    )
    out = tmp_path / "out"
    found = clashes(read_prompt_file(prompts), out, [".json", ".labels.png"], [])
    assert found == [f"{out.resolve() / 'a.json'}: {tmp_path / 'a.png'}, {tmp_path / 'a.png'}"] + [
        f"{out.resolve() / 'a.labels.png'}: {tmp_path / 'a.png'}, {tmp_path / 'a.png'}"
    ]
