"""The client's concept requests (SAM 3, common/concepts.py) against a real HTTP server on 127.0.0.1
(harness/recording.py) that records what it is sent: the fields and forms of SamClient.concepts
(multipart with the image, a JSON body by image_id), the checks that refuse a bad phrase, box or
threshold before anything is sent, the command line's options and the combinations it refuses, a
run's results with the concepts as the COCO file's categories, and the answers the client refuses."""

from __future__ import annotations

import email
import email.policy
import io
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from harness.files import encode
from harness.recording import Reply, Sent, recording
from sam_fast_serve.client import BadAnswer, SamClient
from sam_fast_serve.client.cli import EXIT_FAILED, EXIT_OK, build_parser, concept_fields, main, parse_exemplar_box
from sam_fast_serve.client.coco import CocoImage, categories, mask_size, write_coco
from sam_fast_serve.client.fields import checked_concepts, concept_names
from sam_fast_serve.client.inputs import InputImage
from sam_fast_serve.client.results import Results
from sam_fast_serve.common.concepts import EXEMPLAR_CONCEPT, MAX_CONCEPTS, MAX_EXEMPLARS, MAX_TEXT_CHARS
from sam_fast_serve.common.records import concept_record, rle_to_builtins
from sam_fast_serve.common.wire import IMAGE_ID_HEADER, JSON_MEDIA_TYPE, encode_pickled

HEIGHT, WIDTH = 48, 64
IMAGE_ID = "0123456789abcdef0123456789abcdef"
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there


@dataclass(frozen=True)
class Request:
    """A request as the server got it: its path, headers, and fields (form fields or the JSON
    body, decoded) and the image's bytes (None for a JSON body)."""

    path: str
    content_type: str
    fields: dict
    image: bytes | None


def parsed(content_type: str, body: bytes) -> tuple[dict, bytes | None]:
    """The fields and the image of a request body: multipart (one JSON form field each, the image a
    file part), a JSON body, or a raw image."""
    if content_type.startswith(JSON_MEDIA_TYPE):
        return json.loads(body), None
    if not content_type.startswith("multipart/form-data"):
        return {}, body
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    fields, image = {}, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        if name == "image":
            image = data
        else:
            fields[name] = json.loads(data)
    return fields, image


Answerer = Callable[[Request], tuple[int, object]]


def serving(answer: Answerer, wire: str = "json") -> AbstractContextManager[tuple[str, list[Request]]]:
    """A recording server that answers each POST with `answer(request)`: (status, payload), a 200's
    payload as the `wire` asks (JSON or the pickle), an error's as JSON, with the image id header as
    the server sends it; its URL, and the requests it got."""

    def read(sent: Sent) -> Request:
        content_type = sent.headers.get("Content-Type", "")
        return Request(sent.path, content_type, *parsed(content_type, sent.body))

    def reply(request: Request) -> Reply:
        status, payload = answer(request)
        pickled = status == 200 and wire == "pickle"
        content = encode_pickled(payload).encode() if pickled else json.dumps(payload).encode()
        headers = {"Content-Type": "text/plain" if pickled else JSON_MEDIA_TYPE, IMAGE_ID_HEADER: IMAGE_ID}
        return Reply(status, content, headers)

    return recording(read, reply)


def record(concept: str, box: tuple[int, int, int, int], score: float, size: tuple[int, int] = (HEIGHT, WIDTH)) -> dict:
    """A concept's record as the server sends one: the mask of the XYXY `box` in an image of `size`."""
    x0, y0, x1, y1 = box
    mask = np.zeros(size, np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return concept_record(concept, rle_to_builtins(rle), mask.sum(), mask_utils.toBbox(rle), score)


def concept_answer(request: Request) -> tuple[int, object]:
    """Two instances of the first concept asked for, one of the last, in the image sent (or of
    HEIGHT x WIDTH by image_id): a well-behaved SAM 3 server."""
    size = (HEIGHT, WIDTH)
    if request.image:
        width, height = Image.open(io.BytesIO(request.image)).size
        size = (height, width)
    concepts = concept_names(request.fields)
    records = [record(concepts[0], (2, 2, 20, 20), 0.9, size), record(concepts[0], (30, 5, 40, 15), 0.6, size)]
    return 200, [*records, record(concepts[-1], (10, 25, 50, 45), 0.8, size)]


def photo(seed: int = 0) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))


# SamClient.concepts: what it sends, what it returns


@pytest.mark.parametrize("wire", ["pickle", "json"])
def test_concepts_send_the_image_and_one_json_form_field_each(wire):
    image = photo()
    with serving(concept_answer, wire) as (url, requests):
        with SamClient(url, token="", wire=wire) as sam:
            found = sam.concepts(
                image,
                ("person", "flag"),
                exemplar_boxes=np.array([[1, 2, 30, 40], [5, 5, 9, 9]]),
                exemplar_labels=[1, 0],
                threshold=0.4,
                mask_threshold=np.float64(0.6),
                max_instances=2,
                channels=[0],
            )
    [request] = requests
    assert request.path == "/predictions/sam-fast" and request.content_type.startswith("multipart/form-data")
    assert request.image == image
    assert request.fields == {
        "channels": [0],
        "text": ["person", "flag"],
        "exemplar_boxes": [[1, 2, 30, 40], [5, 5, 9, 9]],
        "exemplar_labels": [1, 0],
        "threshold": 0.4,
        "mask_threshold": 0.6,
        "max_instances": 2,
    }
    assert found == concept_answer(request)[1] and found.image_id == IMAGE_ID
    assert [r["concept"] for r in found] == ["person", "person", "flag"]


def test_only_the_fields_given_are_sent_and_one_phrase_stays_a_string(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(photo())
    with serving(concept_answer) as (url, requests):
        with SamClient(url, token="") as sam:
            found = sam.concepts(path, "person")
            visual = sam.concepts(path, exemplar_boxes=[[1, 2, 30, 40]])
    assert [request.fields for request in requests] == [{"text": "person"}, {"exemplar_boxes": [[1, 2, 30, 40]]}]
    assert {r["concept"] for r in found} == {"person"} and {r["concept"] for r in visual} == {EXEMPLAR_CONCEPT}


def test_by_image_id_the_fields_are_a_json_body_and_no_image_is_sent():
    with serving(concept_answer) as (url, requests):
        with SamClient(url, token="") as sam:
            found = sam.concepts(IMAGE_ID, ["person"], threshold=0.5)
    [request] = requests
    assert request.content_type == JSON_MEDIA_TYPE and request.image is None
    assert request.fields == {"image_id": IMAGE_ID, "text": ["person"], "threshold": 0.5}
    assert len(found) == 3 and found.image_id == IMAGE_ID


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"texts": ""}, "'text' has an empty phrase"),
        ({"texts": ["person", "  "]}, "'text' has an empty phrase"),
        ({"texts": []}, "'text' must be a phrase or a non-empty list of phrases"),
        ({"texts": [3]}, "'text' must be a phrase or a non-empty list of phrases"),
        ({"texts": ["x"] * (MAX_CONCEPTS + 1)}, f"at most {MAX_CONCEPTS} concepts a request"),
        ({"texts": "x" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS}"),
        ({}, "a concept request needs 'text' or 'exemplar_boxes'"),
        ({"exemplar_boxes": [[5, 5, 1, 1]]}, "each box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1"),
        ({"exemplar_boxes": [[1, 2, 3]]}, "'exemplar_boxes' must be a non-empty list"),
        ({"exemplar_boxes": [[0, 0, 1, 1]] * (MAX_EXEMPLARS + 1)}, f"at most {MAX_EXEMPLARS} are allowed"),
        ({"exemplar_boxes": [[0, 0, 1, 1]], "exemplar_labels": [1, 0]}, "'exemplar_labels' must be a list of 1"),
        ({"exemplar_boxes": [[0, 0, 1, 1]], "exemplar_labels": [2]}, "'exemplar_labels' must be a list of 1"),
        ({"texts": "x", "exemplar_labels": [1]}, "'exemplar_labels' given without 'exemplar_boxes'"),
        ({"texts": "x", "threshold": 1.5}, "'threshold' must be a number from 0 to 1"),
        ({"texts": "x", "mask_threshold": -0.1}, "'mask_threshold' must be a number from 0 to 1"),
        ({"texts": "x", "max_instances": 0}, "'max_instances' must be a whole number of at least 1"),
        ({"texts": "x", "points_per_side": 8}, "points_per_side apply to automatic mask generation, not to concepts"),
        ({"texts": "x", "intensity": "loud"}, "option key 'intensity'"),
    ],
)
def test_a_bad_concept_is_refused_with_the_servers_message_before_anything_is_sent(arguments, message):
    with serving(concept_answer) as (url, requests):
        with SamClient(url, token="") as sam, pytest.raises(ValueError) as refused:
            sam.concepts(photo(), **arguments)
    assert message in str(refused.value)
    assert requests == []


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda request: (200, [record("dog", (0, 0, 5, 5), 0.9)]), "not the masks of the concepts person"),
        (lambda request: (200, [{**record("person", (0, 0, 5, 5), 0.9), "score": "high"}]), "lacks a numeric"),
        (lambda request: (200, {"image_id": IMAGE_ID, "prompts": []}), "not the masks of the concepts person"),
    ],
    ids=["another concept", "no numeric score", "a prompted answer"],
)
def test_an_answer_that_is_not_the_concepts_asked_for_is_refused(answer, message):
    with serving(answer) as (url, _), SamClient(url, token="") as sam, pytest.raises(BadAnswer) as refused:
        sam.concepts(photo(), "person")
    assert message in refused.value.message


def test_a_concept_record_is_measured_by_its_score():
    person = record("person", (0, 0, 5, 5), 0.9)
    assert mask_size([person]) == (WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="lacks a numeric area, score or"):
        mask_size([{key: value for key, value in person.items() if key != "score"}])


# The command line


def test_exemplar_boxes_are_parsed_with_their_labels():
    assert parse_exemplar_box("1,2,30,40") == ([1.0, 2.0, 30.0, 40.0], 1)
    assert parse_exemplar_box("1,2,30,40:0") == ([1.0, 2.0, 30.0, 40.0], 0)
    args = build_parser().parse_args(
        [
            "x.png",
            "--text",
            "person",
            "--text",
            "red flag",
            "--exemplar-box",
            "1,2,30,40",
            "--exemplar-box",
            "5,5,9,9:0",
        ]
    )
    args.max_instances, args.threshold, args.mask_threshold = 3, 0.0, 1.0
    assert concept_fields(build_parser(), args) == {
        "text": ["person", "red flag"],
        "exemplar_boxes": [[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 9.0, 9.0]],
        "exemplar_labels": [1, 0],
        "threshold": 0.0,
        "mask_threshold": 1.0,
        "max_instances": 3,
    }
    assert concept_fields(build_parser(), build_parser().parse_args(["x.png"])) == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--exemplar-box", "1,2,30"], "argument --exemplar-box: an exemplar box is X0,Y0,X1,Y1"),
        (["--exemplar-box", "1,2,30,40:2"], "an exemplar box's label is 1 (an example of the concept) or 0"),
        (["--text", "x", "--threshold", "1.5"], "argument --threshold: must be a number from 0 to 1, got 1.5"),
        (["--text", "x", "--mask-threshold", "nan"], "argument --mask-threshold: must be a number from 0 to 1"),
        (["--text", "x", "--max-instances", "0"], "argument --max-instances: must be at least 1, got 0"),
        (["--text", ""], "--text/--exemplar-box: 'text' has an empty phrase"),
        (["--exemplar-box", "5,5,1,1"], "--text/--exemplar-box: 'exemplar_boxes' has [5.0, 5.0, 1.0, 1.0]"),
        (["--text", "a", "--text", "b", "--text", "a"], "--text: 'a' given twice (each phrase is one concept)"),
        (["--threshold", "0.5", "--max-instances", "2"], "--threshold, --max-instances qualify concepts: give --text"),
        (["--text", "x", "--point", "1,1"], "give one kind"),
        (["--exemplar-box", "1,1,5,5", "--box", "1,1,5,5"], "give one kind"),
        (["--text", "x", "--prompts", "p.jsonl"], "give one kind"),
        (
            ["--text", "x", "--points-per-side", "8"],
            "points_per_side apply to automatic mask generation, not to concepts",
        ),
        (["--text", "x", "--frame", "0"], "--text: concepts are found in images, not in videos or stacks"),
    ],
)
def test_concept_options_refused_before_anything_is_sent(capsys, tmp_path, arguments, message):
    (tmp_path / "x.png").write_bytes(photo())
    with serving(concept_answer) as (url, requests), pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "x.png"), "--url", url, "--out", str(tmp_path / "out"), *arguments])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert requests == [] and not (tmp_path / "out").exists()


def test_a_video_with_concepts_is_refused(capsys, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "clip.mp4"), "--url", NOWHERE, "--exemplar-box", "1,1,5,5", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "--exemplar-box: concepts are found in images" in capsys.readouterr().err


# A run: what is sent, what is written, the COCO file


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(photo(i))
    (photos / "3.png").write_bytes(b"")  # a bad file: one failure, and the run goes on
    return photos


def test_a_run_sends_the_concepts_with_every_image_and_writes_them_as_coco_categories(capsys, tmp_path, folder):
    out = tmp_path / "out"
    arguments = [str(folder), "--out", str(out), "--coco", str(out / "coco.json"), "--labels", "png", "--token=t"]
    concepts = ["--text", "person", "--text", "flag", "--exemplar-box", "1,2,30,40:0", "--max-instances", "2"]
    with serving(concept_answer) as (url, requests):
        code = main([*arguments, "--url", url, *concepts])
    assert code == EXIT_FAILED  # the empty file
    assert len(requests) == 3 and all(request.image is not None for request in requests)
    assert all(
        request.fields
        == {"text": ["person", "flag"], "exemplar_boxes": [[1, 2, 30, 40]], "exemplar_labels": [0], "max_instances": 2}
        for request in requests
    )
    shown = capsys.readouterr()
    assert "4 images: 3 segmented, 1 failed" in shown.out and "3.png: FAILED: the file is empty" in shown.err
    for i in range(3):
        records = json.loads((out / f"{i}.json").read_text())
        assert [r["concept"] for r in records] == ["person", "person", "flag"]
        assert (out / f"{i}.overlay.png").is_file() and (out / f"{i}.labels.png").is_file()
    labels = np.asarray(Image.open(out / "0.labels.png"))
    assert labels.dtype == np.uint16 and sorted(np.unique(labels)) == [0, 1, 2, 3]

    coco = json.loads((out / "coco.json").read_text())
    assert coco["categories"] == [
        {"id": 1, "name": "person", "supercategory": "object"},
        {"id": 2, "name": "flag", "supercategory": "object"},
    ]
    assert [(a["image_id"], a["category_id"], a["score"]) for a in coco["annotations"]] == [
        (image, category, score) for image in (1, 2, 3) for category, score in ((1, 0.9), (1, 0.6), (2, 0.8))
    ]
    dataset = COCO(str(out / "coco.json"))
    first = dataset.loadAnns(dataset.getAnnIds(imgIds=[1], catIds=[2]))[0]
    assert dataset.annToMask(first)[25:45, 10:50].all() and dataset.annToMask(first).sum() == 40 * 20

    # The same command again: every image done, nothing sent, the COCO file written again.
    with serving(concept_answer) as (url, requests):
        assert main([*arguments, "--url", url, *concepts]) == EXIT_FAILED
    assert requests == [] and json.loads((out / "coco.json").read_text()) == coco
    assert "4 images: 0 segmented, 3 already done (skipped), 1 failed" in capsys.readouterr().out


def test_an_exemplar_run_is_one_concept_visual(tmp_path, folder):
    (folder / "3.png").unlink()
    out = tmp_path / "out"
    arguments = [
        str(folder),
        "--token=t",
        "--out",
        str(out),
        "--coco",
        str(out / "c.json"),
        "--exemplar-box",
        "1,1,9,9",
    ]
    with serving(concept_answer, "pickle") as (url, requests):
        assert main([*arguments, "--url", url]) == EXIT_OK
    assert [request.fields for request in requests] == [{"exemplar_boxes": [[1, 1, 9, 9]], "exemplar_labels": [1]}] * 3
    coco = json.loads((out / "c.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": EXEMPLAR_CONCEPT, "supercategory": "object"}]
    assert len(coco["annotations"]) == 9 and {a["category_id"] for a in coco["annotations"]} == {1}


def test_an_earlier_result_of_other_concepts_is_sent_again(tmp_path):
    out = tmp_path / "out"
    image = InputImage(1, tmp_path / "a.png", PurePosixPath("a.png"))
    image.path.write_bytes(photo())
    out.mkdir()
    image.result(out).write_text(json.dumps([record("person", (0, 0, 5, 5), 0.9)]))
    assert Results(out, concepts=("person", "flag")).earlier(image) is not None
    assert Results(out, concepts=("flag",)).earlier(image) is None
    assert Results(out).earlier(image) is None  # not an automatic answer either


def test_coco_categories_are_the_concepts_in_order(tmp_path):
    result = tmp_path / "a.json"
    result.write_text(json.dumps([record("b", (0, 0, 5, 5), 0.7), record("a", (1, 1, 4, 4), 0.5)]))
    images = [CocoImage(1, "a.png", WIDTH, HEIGHT, result)]
    stream = io.StringIO()
    assert write_coco(stream, images, ("a", "b", "a")) == 2  # a phrase asked twice: its records are the first's
    coco = json.loads(stream.getvalue())
    assert [c["name"] for c in coco["categories"]] == ["a", "b", "a"]
    assert [(a["category_id"], a["score"]) for a in coco["annotations"]] == [(2, 0.7), (1, 0.5)]
    with pytest.raises(ValueError, match=r"a mask of concept 'b' is none of the run's concepts \(a\)"):
        write_coco(io.StringIO(), images, ("a",))
    assert categories() == [{"id": 1, "name": "object", "supercategory": "object"}]


def test_checked_concepts_keep_what_is_given():
    assert checked_concepts("cell") == {"text": "cell"}
    assert checked_concepts(exemplar_boxes=[(0, 0, 4, 4)], max_instances=np.int64(3)) == {
        "exemplar_boxes": [[0, 0, 4, 4]],
        "max_instances": 3,
    }
    assert concept_names({"text": "cell"}) == ("cell",) and concept_names({"exemplar_boxes": []}) == ("visual",)
