"""sam-fast-client (run as `python inference.py`) over folders and globs of images against a real
TorchServe: results and overlays per image, the COCO file against the server's own masks, the
failures report, resume after Ctrl-C (counted in TorchServe's access log), the progress bar on a
terminal, and the arguments it refuses before sending anything; real bad files each one failure,
an empty file and one over TorchServe's request size limit too, each with its reason, a refused
token the end of the run after one request, the server's options, prompt files, label images, and
`python inference.py` without arguments."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage import data

import sam_fast_serve
from harness.archives import client_command, run_client, smoke_archive
from harness.files import encode, tiff
from harness.servers import REPO, TorchServe
from sam_fast_serve.client.batch import EMPTY_FILE
from sam_fast_serve.client.coco import CocoImage, header_size, masks_of, write_coco
from sam_fast_serve.client.http import unexplained
from sam_fast_serve.common.labels import label_image
from sam_fast_serve.common.wire import decode_pickled, is_annotation_list

MASKS_PER_IMAGE = 16 * 3  # smoke config: 4x4 points, 3 masks each, nothing filtered
BROKEN = b"\x89PNG\r\n\x1a\n truncated"
EXIF_ORIENTATION = 0x0112
# Globs the client expands itself (no shell): one level, and recursive.
GLOBS = ("extra/*.png", "extra/**/*.jpg")


def _variants() -> dict[str, np.ndarray]:
    """20 photos with distinct pixels: five scikit-image photos, each as is, flipped, mirrored
    and cropped."""
    photos = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket()[::2, ::2],
        "hubble": data.hubble_deep_field()[::2, ::2],
    }
    variants = {}
    for name, rgb in photos.items():
        h, w = rgb.shape[:2]
        variants[f"{name}/{name}"] = rgb
        variants[f"{name}/flipped"] = rgb[::-1]
        variants[f"{name}/nested/mirrored"] = rgb[:, ::-1]
        variants[f"{name}/nested/deeper/crop"] = rgb[h // 5 : h - h // 5, w // 6 : w - w // 6]
    return variants


@dataclass(frozen=True)
class Photos:
    """The inputs of a run: `arguments` (the folder, then the globs), each good image's bytes by
    the name the client gives it (its path relative to the folder, its file name for a glob
    match), and the names of all inputs in input order (which gives the COCO image ids)."""

    folder: Path
    arguments: list[str]
    good: dict[str, bytes]
    order: list[str]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Photos:
    """A folder of 22 files (nested, PNG and JPEG, one .JPEG, one EXIF-rotated JPEG, one broken
    PNG) plus files the client must pass over, and a second folder for the globs."""
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    files: dict[str, bytes] = {}
    for i, (name, rgb) in enumerate(_variants().items()):
        suffix = (".png", ".jpg", ".png", ".JPEG")[i % 4]
        files[name + suffix] = encode(np.ascontiguousarray(rgb), "PNG" if suffix == ".png" else "JPEG")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # 300x200 in the file, 200x300 turned as the server turns it
    files["rotated.jpg"] = encode(data.chelsea()[50:250, 100:400], "JPEG", exif=exif.tobytes())
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    (folder / "broken.png").write_bytes(BROKEN)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "skipped.png").write_bytes(files["astronaut/astronaut.png"])
    glob_files = {
        "extra/one.png": encode(data.immunohistochemistry()),
        "extra/deep/three.jpg": encode(data.immunohistochemistry()[::-1, ::-1], "JPEG"),
        "extra/deep/two.png": encode(data.coins()),  # matched by neither glob
    }
    for name, content in glob_files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    in_folder = sorted(PurePosixPath(name) for name in [*files, "broken.png"])
    order = [str(name) for name in in_folder] + ["one.png", "three.jpg"]
    good = {**files, "one.png": glob_files["extra/one.png"], "three.jpg": glob_files["extra/deep/three.jpg"]}
    return Photos(folder, [str(folder), *(str(root / pattern) for pattern in GLOBS)], good, order)


def post(server, body: bytes, **headers: str) -> requests.Response:
    headers = {**server.auth(), "Content-Type": "application/octet-stream", **headers}
    return requests.post(f"{server.inference_url}/predictions/sam-fast", data=body, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def answers(server, photos) -> dict[str, list]:
    """The server's own annotations for every good image, each from a direct POST."""
    found = {}
    for name, content in photos.good.items():
        reply = post(server, content)
        assert reply.status_code == 200, reply.text
        found[name] = decode_pickled(reply.text)
    return found


def result_name(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(".json"))


def posts_logged(server, probe: bytes) -> int:
    """POST /predictions lines in TorchServe's access log once every request it took is answered:
    the image `probe` sent now is answered after those (one worker, batches of one), then the
    count is read until it holds still."""
    assert post(server, probe).status_code == 200
    log = server.workdir / "logs" / "access_log.log"
    counts = [-1]
    while True:
        time.sleep(0.5)
        counts.append(log.read_text().count("POST /predictions/"))
        if counts[-1] == counts[-2]:
            return counts[-1]


def check_coco(path: Path, answers: dict[str, list], order: list[str]) -> None:
    """pycocotools loads the file; it holds each of `answers`' images once, with the id of its
    place in `order` and the size of its masks, and each image's annotations are the server's
    masks in order: annToMask equal to the decoded RLE, score = predicted IoU."""
    coco = COCO(str(path))
    images = coco.dataset["images"]
    assert sorted(image["file_name"] for image in images) == sorted(answers)
    assert len({image["id"] for image in images}) == len(images)
    annotation_ids = [ann["id"] for ann in coco.dataset["annotations"]]
    assert sorted(annotation_ids) == list(range(1, len(annotation_ids) + 1))
    assert coco.dataset["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    for image in images:
        expected = answers[image["file_name"]]
        assert image["id"] == order.index(image["file_name"]) + 1
        height, width = expected[0]["segmentation"]["size"]
        assert (image["width"], image["height"]) == (width, height)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == len(expected) == MASKS_PER_IMAGE
        for ann, mask in zip(annotations, expected):
            assert np.array_equal(coco.annToMask(ann), mask_utils.decode(mask["segmentation"]))
            assert (ann["score"], ann["bbox"], ann["area"]) == (mask["predicted_iou"], mask["bbox"], mask["area"])
            assert (ann["category_id"], ann["iscrowd"]) == (1, 0)


def test_folder_and_globs_to_results_overlays_coco_and_failures(server, photos, answers, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    run = run_client(
        *photos.arguments, missing, tmp_path / "nothing" / "*.png", "--out", out, "--coco", out / "coco.json",
        server=server,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    good = photos.good
    total = len(good) + 2  # the broken PNG and the missing file
    assert f"{total} images: {len(good)} segmented, 2 failed" in run.stdout
    assert "nothing/*.png: no image" in run.stderr
    assert f"{photos.folder / 'broken.png'}: FAILED: HTTP 400" in run.stderr
    for name in good:
        written = json.loads((out / result_name(name)).read_text())
        assert written == answers[name]
        with Image.open(out / PurePosixPath(name).with_suffix(".overlay.png")) as overlay:
            height, width = answers[name][0]["segmentation"]["size"]
            assert overlay.size == (width, height)
    results = sorted(str(p.relative_to(out)) for p in out.rglob("*.json"))
    assert results == sorted([*map(result_name, good), "coco.json"])
    assert not list(out.rglob("*.tmp"))

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(failures, key=lambda failure: failure["file"]) == [
        {"file": str(photos.folder / "broken.png"), "status": 400, "reason": post(server, BROKEN).json()["message"]},
        {"file": str(missing), "status": None, "reason": "cannot read the image: No such file or directory"},
    ]

    check_coco(out / "coco.json", answers, [*photos.order, "missing.png"])
    # The EXIF-rotated JPEG is 300x200 in the file; the server, and so the COCO file, turn it.
    assert header_size(photos.folder / "rotated.jpg") == (200, 300)
    assert answers["rotated.jpg"][0]["segmentation"]["size"] == [300, 200]


def test_interrupted_run_resumes_sending_only_what_is_missing(server, photos, answers, tmp_path):
    out, coco = tmp_path / "out", tmp_path / "out" / "coco.json"
    arguments = [*photos.arguments, "--out", str(out), "--coco", str(coco)]
    started = subprocess.Popen(
        [*client_command(server), *arguments, "--concurrency", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(list(out.rglob("*.json"))) < 3 and time.monotonic() < deadline and started.poll() is None:
        time.sleep(0.05)
    started.send_signal(signal.SIGINT)
    stdout, stderr = started.communicate(timeout=120)
    assert started.returncode == 130, stderr
    assert "interrupted" in stderr

    # Everything written is whole: results, overlays, the COCO file of what was done.
    done = {name for name in photos.good if (out / result_name(name)).exists()}
    assert 3 <= len(done) < len(photos.good)
    assert f"{len(photos.order)} images: {len(done)} segmented" in stdout
    for name in done:
        assert is_annotation_list(json.loads((out / result_name(name)).read_text()))
        with Image.open(out / PurePosixPath(name).with_suffix(".overlay.png")) as overlay:
            overlay.load()
    assert not list(out.rglob("*.tmp"))
    check_coco(coco, {name: answers[name] for name in done}, photos.order)
    stamps = {name: (out / result_name(name)).stat().st_mtime_ns for name in done}

    probe = photos.good["astronaut/astronaut.png"]
    before = posts_logged(server, probe)
    rerun = run_client(*arguments, server=server)
    sent = posts_logged(server, probe) - before - 1  # less the probe
    assert rerun.returncode == 1, rerun.stderr  # the broken PNG fails again
    assert sent == len(photos.order) - len(done)
    assert (
        f"{len(photos.order)} images: {len(photos.good) - len(done)} segmented, {len(done)} already done (skipped)"
        in rerun.stdout
    )
    assert {name: (out / result_name(name)).stat().st_mtime_ns for name in done} == stamps
    check_coco(coco, answers, photos.order)


def run_in_terminal(command: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal (160 columns) as stdin, stdout and stderr; its exit
    status and everything it wrote there."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([controller], [], [], 1)[0]:
            try:
                chunk = os.read(controller, 1 << 16)
            except OSError:  # EIO: the command has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(controller)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_no_overlay(server, photos, tmp_path):
    folder = photos.folder
    images = [folder / "astronaut" / "astronaut.png", folder / "chelsea" / "flipped.jpg", folder / "broken.png"]
    command = [*client_command(server), *map(str, images), "--out", str(tmp_path / "out"), "--no-overlay"]
    status, shown = run_in_terminal(command)
    assert status == 1, shown
    assert re.search(r"3/3 \[.*\d+\.\d+img/s, failed=1, skipped=0\]", shown), shown
    assert f"{images[0]}: {MASKS_PER_IMAGE} masks" in shown and f"{images[2]}: FAILED: HTTP 400" in shown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.json", "failures.jsonl", "flipped.json"]

    status, shown = run_in_terminal([*command, "--progress", "never"])
    assert status == 1 and "3 images: 0 segmented, 2 already done (skipped), 1 failed" in shown
    assert "img/s" not in shown


def test_prompts_to_coco(server, photos, tmp_path):
    """Prompted answers (JSON wire format): every mask of every prompt becomes an annotation."""
    folder = photos.folder
    images = [folder / "astronaut" / "astronaut.png", folder / "coffee" / "coffee.png"]
    boxes = [[100, 50, 300, 260], [10, 100, 200, 290]]
    prompts = [
        "--point",
        "150,120",
        "--point",
        "60,200:0",
        *(a for box in boxes for a in ("--box", ",".join(map(str, box)))),
    ]
    out = tmp_path / "out"
    run = run_client(*images, "--out", out, "--coco", out / "coco.json", "--format", "json", *prompts, server=server)
    assert run.returncode == 0, run.stderr
    coco = COCO(str(out / "coco.json"))
    assert [image["file_name"] for image in coco.dataset["images"]] == ["astronaut.png", "coffee.png"]
    for image, path in zip(coco.dataset["images"], images):
        request = {"image": base64.b64encode(path.read_bytes()).decode(), "boxes": boxes}
        request |= {"points": [[150, 120], [60, 200]], "labels": [1, 0]}
        reply = post(server, json.dumps(request).encode(), **{"Content-Type": "application/json"})
        masks = [mask for prompt in decode_pickled(reply.text)["prompts"] for mask in prompt["masks"]]
        assert len(masks) == 2  # one mask per box
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert [ann["score"] for ann in annotations] == [mask["predicted_iou"] for mask in masks]
        for ann, mask in zip(annotations, masks):
            assert np.array_equal(coco.annToMask(ann), mask_utils.decode(mask["segmentation"]))
        assert (out / path.with_suffix(".overlay.png").name).stat().st_size > 1000


def test_two_inputs_with_one_result_name_are_refused(tmp_path):
    for name in ("a/x.png", "b/x.jpg", "c/x.png", "c/x.JPG"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(encode(data.chelsea()))
    out = tmp_path / "out"
    for inputs, options in (
        ([tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"], []),  # two files
        ([tmp_path / "c"], []),  # x.png and x.JPG in one folder
        ([tmp_path / "a"], ["--coco", out / "x.json"]),  # the COCO file over a result
    ):
        run = run_client(*inputs, "--out", out, *options)
        assert run.returncode == 2 and "refusing to write one file twice" in run.stderr, run.stderr
        assert str((out / "x.json").resolve()) in run.stderr
    assert not out.exists()


def test_arguments_refused_before_anything_is_sent(tmp_path):
    for bad in (["--point", "1,2,3"], ["--point", "1,2:7"], ["--box", "1,2,3"], ["--concurrency", "0"]):
        run = run_client(tmp_path / "x.png", *bad)
        assert run.returncode == 2 and bad[0] in run.stderr, run.stderr
    (tmp_path / "empty").mkdir()
    run = run_client(tmp_path / "empty", tmp_path / "*.webp")
    assert run.returncode == 2 and "empty: no image" in run.stderr and "no images to segment" in run.stderr
    shown = run_client("--version")
    assert shown.returncode == 0 and shown.stdout.split() == ["sam-fast-client", sam_fast_serve.__version__]


def test_client_and_common_import_no_server_package():
    # Every module of client/ and common/, and the package itself: none imports torch or the server's parts.
    modules = [
        ".".join(path.relative_to(REPO).with_suffix("").parts)
        for folder in ("client", "common")
        for path in sorted((REPO / "sam_fast_serve" / folder).glob("*.py"))
    ]
    assert len(modules) > 10
    script = f"import json, sys, importlib; [importlib.import_module(m) for m in {modules!r}]; print(json.dumps(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    imported = set(json.loads(loaded.stdout))
    top_level = {name.split(".")[0] for name in imported}
    assert set(modules) <= imported
    assert not {"torch", "cv2", "segment_anything", "sam2", "ts", "yaml", "redis"} & top_level
    assert not {name for name in imported if name.startswith(("sam_fast_serve.server", "sam_fast_serve.models"))}


def test_coco_size_of_an_image_without_masks_comes_from_its_turned_header(tmp_path):
    exif = Image.Exif()
    for orientation, size in ((1, (300, 200)), (6, (200, 300)), (8, (200, 300))):
        exif[EXIF_ORIENTATION] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        path.write_bytes(encode(data.chelsea()[:200, :300], "JPEG", exif=exif.tobytes()))
        assert header_size(path) == size
    (tmp_path / "o6.json").write_text("[]")
    with open(tmp_path / "coco.json", "w") as stream:
        count = write_coco(stream, [CocoImage(7, "o6.jpg", *header_size(tmp_path / "o6.jpg"), tmp_path / "o6.json")])
    coco = COCO(str(tmp_path / "coco.json"))
    assert count == 0 and coco.dataset["annotations"] == []
    assert coco.dataset["images"] == [{"id": 7, "file_name": "o6.jpg", "width": 200, "height": 300}]


# --- One bad file is one failure; a refused token stops the run; options, prompt files, label images.


def access_log_posts(server) -> int:
    """POST /predictions lines in TorchServe's access log, read until the count holds still (the
    requests counted are all answered: the client that sent them has exited)."""
    log = server.workdir / "logs" / "access_log.log"
    counts = [-1]
    while True:
        counts.append(log.read_text().count("POST /predictions/"))
        if counts[-1] == counts[-2]:
            return counts[-1]
        time.sleep(0.5)


def corrupt_strip(data: bytes) -> bytes:
    """A TIFF with its strip's compressed bytes overwritten: the header reads, the pixels do not."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    return data[:offset] + b"\xff" * count + data[offset + count :]


def test_bad_files_are_one_failure_each_and_the_run_goes_on(server, tmp_path):
    folder, out = tmp_path / "mixed", tmp_path / "out"
    folder.mkdir()
    rgb = np.ascontiguousarray(data.astronaut()[::4, ::4])
    good = {
        f"{kind}.tif": tiff(rgb, photometric="rgb", compression=kind) for kind in ("lzw", "packbits", "jpeg", "zstd")
    }
    bad = {
        "truncated.jpg": encode(rgb, "JPEG")[:3000],
        "notes.png": b"not an image at all",
        "corrupt.tif": corrupt_strip(tiff(rgb, photometric="rgb", compression="lzw", rowsperstrip=rgb.shape[0])),
    }
    for name, content in {**good, **bad}.items():
        (folder / name).write_bytes(content)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")  # listed in the folder, unreadable
    command = [folder, "--out", out, "--coco", out / "coco.json", "--labels", "png"]
    run = run_client(*command, server=server)
    assert run.returncode == 1, run.stderr
    assert "8 images: 4 segmented, 4 failed" in run.stdout
    failures = {Path(f["file"]).name: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert failures["gone.png"] == {
        "file": str(folder / "gone.png"),
        "status": None,
        "reason": "cannot read the image: No such file or directory",
    }
    for name, status in (("truncated.jpg", 400), ("notes.png", 415), ("corrupt.tif", 400)):
        refused = post(server, bad[name])
        assert refused.status_code == status
        assert failures[name] == {"file": str(folder / name), "status": status, "reason": refused.json()["message"]}
    for name in good:
        with Image.open(out / PurePosixPath(name).with_suffix(".overlay.png")) as overlay:
            assert overlay.size == (rgb.shape[1], rgb.shape[0])
        with Image.open(out / PurePosixPath(name).with_suffix(".labels.png")) as labels:
            assert labels.size == (rgb.shape[1], rgb.shape[0])
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == sorted(good)

    # The client reads what it draws itself: an image replaced since by one it cannot decode, whose
    # overlay is missing, is one failure of the rerun (nothing is sent: its result is there).
    (folder / "lzw.tif").write_bytes(corrupt_strip(good["lzw.tif"]))
    (out / "lzw.overlay.png").unlink()
    for name in bad:
        (folder / name).unlink()
    before = access_log_posts(server)
    rerun = run_client(*command, server=server)
    assert access_log_posts(server) == before  # nothing sent: the results are there, the symlink unreadable
    assert rerun.returncode == 1, rerun.stderr
    assert "5 images: 0 segmented, 3 already done (skipped), 2 failed" in rerun.stdout
    failures = {Path(f["file"]).name: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert sorted(failures) == ["gone.png", "lzw.tif"] and failures["lzw.tif"]["status"] is None
    assert failures["lzw.tif"]["reason"].startswith(
        "done earlier, but the image cannot be drawn or measured: the TIFF page"
    )
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == ["jpeg.tif", "packbits.tif", "zstd.tif"]


def test_an_empty_file_is_one_failure_not_sent_and_the_server_says_so_too(server, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "good.png").write_bytes(encode(data.chelsea()))
    before = access_log_posts(server)
    run = run_client(folder, "--out", out, server=server)
    assert access_log_posts(server) == before + 1  # good.png alone
    assert run.returncode == 1 and "2 images: 1 segmented, 1 failed" in run.stdout, run.stderr
    assert f"{folder / 'empty.png'}: FAILED: the file is empty (0 bytes)" in run.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"file": str(folder / "empty.png"), "status": None, "reason": EMPTY_FILE}]
    # Sent anyway, as the body or as a multipart field, the server names it the same way.
    url = f"{server.inference_url}/predictions/sam-fast"
    for reply in (post(server, b""), requests.post(url, files={"image": ("empty.png", b"")}, headers=server.auth())):
        assert reply.status_code == 400 and reply.json()["message"] == "the image is empty (0 bytes)", reply.text


def test_a_file_over_torchserves_request_size_limit_is_one_failure_with_its_size(tmp_path, random_checkpoint):
    """TorchServe answers a body over max_request_size with an empty 413 before the handler sees it:
    the reason is the client's, true of a server set lower than the shipped config too."""
    limit = 1 << 20
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    big = encode(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    assert len(big) > limit
    (folder / "big.png").write_bytes(big)
    (folder / "small.png").write_bytes(encode(data.chelsea()[::4, ::4]))
    archive = smoke_archive(tmp_path, random_checkpoint)
    (tmp_path / "torchserve").mkdir()
    small_limit = TorchServe(tmp_path / "torchserve", archive.parent, archive.name, f"max_request_size={limit}\n")
    small_limit.start()
    try:
        refused = post(small_limit, big)
        assert (refused.status_code, refused.content) == (413, b"")  # the answer the client explains
        run = run_client(folder, "--out", out, server=small_limit)
    finally:
        small_limit.stop()
    assert run.returncode == 1 and "2 images: 1 segmented, 1 failed" in run.stdout, run.stderr
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure == {"file": str(folder / "big.png"), "status": 413, "reason": unexplained(413, "", len(big))}
    assert failure["reason"].startswith(
        f"the server refused the request before reading it: the file is {len(big) / 2**20:.1f} MiB ({len(big)} bytes)"
    )
    assert failure["reason"].endswith("this project's config.properties sets 26214400 bytes = 25 MiB)")


def test_a_refused_token_stops_the_run_after_one_request(server, photos, tmp_path):
    out = tmp_path / "out"
    environment = {k: v for k, v in os.environ.items() if k != "TS_INFERENCE_TOKEN"}
    environment["XDG_STATE_HOME"] = str(tmp_path / "state")  # no server recorded
    looked = (
        f"; no inference token: $TS_INFERENCE_TOKEN is unset, no server is recorded for {server.inference_url} in "
        f"{tmp_path / 'state' / 'sam-fast-serve' / 'servers'} (make serve records it), and there is no "
        f"{tmp_path / 'key_file.json'}); nothing more was sent."
    )
    for token in (["--token=not-the-token"], []):  # a wrong token, and none (no key_file.json in the cwd)
        before = access_log_posts(server)
        run = run_client(
            *photos.arguments, "--url", server.inference_url, *token, "--out", out, "--coco", out / "coco.json",
            cwd=tmp_path, env=environment,
        )  # fmt: skip
        assert access_log_posts(server) == before + 1
        assert run.returncode == 3, run.stderr
        assert "the server refused the token (HTTP 400: Token Authorization failed." in run.stderr
        assert all(way in run.stderr for way in ("--token=VALUE", "$TS_INFERENCE_TOKEN", "key_file.json"))
        assert (looked in run.stderr) == (not token), run.stderr  # where it looked, when it found no token
        assert f"{len(photos.order)} images: 0 segmented\n" in run.stdout
        assert (out / "failures.jsonl").read_text() == ""
        assert json.loads((out / "coco.json").read_text())["images"] == []


def json_post(server, fields: dict, content: bytes) -> list | dict:
    """The server's decoded answer to a JSON request of `fields` and the image `content`."""
    body = json.dumps({"image": base64.b64encode(content).decode(), **fields}).encode()
    reply = post(server, body, **{"Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    return decode_pickled(reply.text)


def test_options_reach_the_server(server, photos, tmp_path):
    image = photos.folder / "coffee" / "coffee.png"
    out = tmp_path / "out"
    run = run_client(image, "--out", out, "--points-per-side", "2", "--channels", "1", "--wire", "json", server=server)
    assert run.returncode == 0, run.stderr
    written = json.loads((out / "coffee.json").read_text())
    assert len(written) == 2 * 2 * 3  # the smoke config's 4x4 grid gives 48
    assert written == json_post(server, {"points_per_side": 2, "channels": [1]}, image.read_bytes())


def test_a_prompt_file_gives_each_image_its_prompts(server, photos, tmp_path):
    folder = photos.folder
    lines = [
        {"file": "astronaut/astronaut.png", "points": [[150, 120], [60, 200]], "labels": [1, 0]},
        {"file": "chelsea/flipped.jpg", "boxes": [[20, 30, 200, 150], [100, 100, 300, 250]]},
    ]
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    try:
        run = run_client(
            "--prompts", prompts, "--out", out, "--labels", "tiff", "--coco", out / "c.json", server=server
        )
    finally:
        prompts.unlink()
    assert run.returncode == 0, run.stderr
    for line in lines:
        fields = {key: value for key, value in line.items() if key != "file"}
        expected = json_post(server, fields, (folder / line["file"]).read_bytes())
        result = out / PurePosixPath(line["file"]).with_suffix(".json")
        written = json.loads(result.read_text())
        assert written == expected and len(written["prompts"]) == len(line.get("boxes", [[]]))
        labels = tifffile.imread(result.with_suffix("").with_suffix(".labels.tif"))
        height, width = masks_of(written)[0]["segmentation"]["size"]
        assert labels.dtype == np.uint16 and np.array_equal(labels, label_image(masks_of(written), (height, width)))
        assert result.with_suffix("").with_suffix(".overlay.png").exists()
    assert len(COCO(str(out / "c.json")).dataset["images"]) == 2

    prompts.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"file": "x.png", "points": [[1, 2]], "labels": [3]}))
    refused = run_client("--prompts", prompts, "--out", tmp_path / "refused", server=server)
    assert refused.returncode == 2 and f"{prompts}:2: 'labels' must be a list of 1 values" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_label_images_are_the_answers_masks_at_the_inputs_size(server, tmp_path, chelsea, astronaut):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(encode(chelsea, "JPEG"))
    # Two pages of different sizes: --page 1 segments the second, so its label image is that size.
    pages = [astronaut[:64, :64, 0], np.ascontiguousarray(chelsea[:120, :200, 1]).astype(np.uint16) * 200]
    with tifffile.TiffWriter(folder / "pages.tif") as writer:
        for page in pages:
            writer.write(page)
    run = run_client(folder, "--out", out, "--labels", "png", "--page", "1", server=server)
    assert run.returncode == 1, run.stderr  # a JPEG has no page 1
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["status"] == 422 and "page 1 does not exist" in failure["reason"]
    run = run_client(folder / "cat.jpg", "--out", out, "--labels", "png", server=server)
    assert run.returncode == 0, run.stderr
    # A second run asks for TIFF label images: drawn from the results, nothing is sent.
    again = run_client(folder, "--out", out, "--labels", "tiff", "--page", "1", server=server)
    assert again.returncode == 0 and "2 images: 0 segmented, 2 already done (skipped)\n" in again.stdout, again.stderr
    for name, (height, width) in (("cat", chelsea.shape[:2]), ("pages", pages[1].shape)):
        masks = json.loads((out / f"{name}.json").read_text())
        expected = label_image(masks, (height, width))
        assert len(masks) == MASKS_PER_IMAGE and expected.max() > 0
        with Image.open(out / f"{name}.labels.png") as png:
            assert png.size == (width, height) and np.array_equal(np.asarray(png), expected)
        tif = tifffile.imread(out / f"{name}.labels.tif")
        assert tif.dtype == np.uint16 and np.array_equal(tif, expected)


def test_inference_py_without_arguments_segments_the_sample(server, tmp_path):
    shutil.copy(server.key_file, tmp_path / "key_file.json")
    environment = {k: v for k, v in os.environ.items() if k != "TS_INFERENCE_TOKEN"}
    environment["SAM_FAST_URL"] = server.inference_url
    run = subprocess.run(
        [sys.executable, str(REPO / "inference.py")], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert run.returncode == 0, run.stderr
    sample = REPO / "samples" / "astronaut.jpg"
    assert f"{sample}: {MASKS_PER_IMAGE} masks" in run.stdout
    assert "-> out/astronaut.json, out/astronaut.overlay.png" in run.stdout
    assert json.loads((tmp_path / "out" / "astronaut.json").read_text()) == decode_pickled(
        post(server, sample.read_bytes()).text
    )
    with Image.open(tmp_path / "out" / "astronaut.overlay.png") as overlay, Image.open(sample) as photo:
        assert overlay.size == photo.size
