"""What the client writes for an answer, with real image files: overlays of compressed TIFFs
(imagecodecs is in the base install), label images, a file it cannot draw as that image's
failure instead of the end of the run, and the banner across an overlay's top."""

from __future__ import annotations

import io
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from harness.files import encode, tiff
from sam_fast_serve.client.http import Answer
from sam_fast_serve.client.inputs import InputImage
from sam_fast_serve.client.overlay import BANNER_FILL, BANNER_TEXT, overlay_png
from sam_fast_serve.client.results import Results
from sam_fast_serve.common.labels import label_image
from sam_fast_serve.common.records import amg_record, rle_to_builtins

HEIGHT, WIDTH = 48, 64
COMPRESSIONS = ("lzw", "packbits", "jpeg", "zstd")
SMOKE_BANNER = "SMOKE TEST: random weights, the masks are meaningless"


def record(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle)
    return amg_record(rle_to_builtins(rle), mask.sum(), (x, y, w, h), 0.9, [[x, y]], 0.95, [0, 0, WIDTH, HEIGHT])


def masks() -> list[dict]:
    """A large mask and a small one on top of it."""
    large, small = np.zeros((2, HEIGHT, WIDTH), bool)
    large[5:40, 5:60] = True
    small[10:20, 10:20] = True
    return [record(large), record(small)]


def photo_tiff(compression: str, pages: int = 1) -> bytes:
    """A TIFF of `pages` pages of random RGB, each page one strip."""
    rgb = np.random.default_rng(0).integers(0, 255, (pages, HEIGHT, WIDTH, 3), dtype=np.uint8)
    return tiff(rgb, compression=compression, photometric="rgb", rowsperstrip=HEIGHT)


def corrupt_strip(data: bytes) -> bytes:
    """The TIFF with its strip's compressed bytes overwritten: the header reads, the pixels do not."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    return data[:offset] + b"\xff" * count + data[offset + count :]


def image_at(path: Path, data: bytes) -> InputImage:
    path.write_bytes(data)
    return InputImage(1, path, PurePosixPath(path.name))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compressed_tiffs_get_an_overlay_and_labels(tmp_path, compression):
    image = image_at(tmp_path / f"{compression}.tif", photo_tiff(compression))
    results = Results(tmp_path / "out", overlay=True, labels="png", coco=True)
    outcome, files = results.answered(image, image.path.read_bytes(), Answer(masks(), None, 100), 0.1)
    assert outcome.reason is None and outcome.size == (WIDTH, HEIGHT)
    written = dict(files)
    assert list(written) == [image.output(results.out, s) for s in (".overlay.png", ".labels.png", ".json")]
    with Image.open(io.BytesIO(written[image.output(results.out, ".overlay.png")])) as overlay:
        assert overlay.size == (WIDTH, HEIGHT)
    labels = np.asarray(Image.open(io.BytesIO(written[image.output(results.out, ".labels.png")])))
    assert labels.dtype == np.uint16 and np.array_equal(labels, label_image(masks(), (HEIGHT, WIDTH)))
    assert json.loads(written[image.result(results.out)]) == masks()


def test_a_tiff_the_client_cannot_decode_is_one_failure(tmp_path):
    image = image_at(tmp_path / "broken.tif", corrupt_strip(photo_tiff("lzw")))
    results = Results(tmp_path / "out")
    outcome, files = results.answered(image, image.path.read_bytes(), Answer(masks(), None, 100), 0.1)
    assert files == [] and outcome.sent
    assert outcome.reason.startswith("segmented, but the image cannot be drawn or measured: the TIFF page cannot be")
    assert outcome.line.startswith(f"{image.path}: FAILED: ")


def test_a_page_that_is_not_there_is_one_failure(tmp_path):
    from sam_fast_serve.common.options import ImageSettings

    image = image_at(tmp_path / "two.tif", photo_tiff("zlib", pages=2))
    drawn, _ = Results(tmp_path / "out", image=ImageSettings(page=1)).answered(
        image, image.path.read_bytes(), Answer(masks(), None, 1), 0
    )
    assert drawn.reason is None
    outcome, _ = Results(tmp_path / "out", image=ImageSettings(page=2)).answered(
        image, image.path.read_bytes(), Answer(masks(), None, 1), 0
    )
    assert "page 2 does not exist: the TIFF has 2 page(s)" in outcome.reason


def test_a_resumed_image_draws_what_it_lacks_and_a_broken_one_fails(tmp_path):
    out = tmp_path / "out"
    image = image_at(tmp_path / "a.tif", photo_tiff("lzw"))
    image.result(out).parent.mkdir(parents=True)
    image.result(out).write_text(json.dumps(masks()))
    results = Results(out, overlay=True, labels="tiff")
    payload = results.earlier(image)
    assert payload == masks()
    outcome, files = results.resumed(image, payload)
    assert outcome.skipped and [path.name for path, _ in files] == ["a.overlay.png", "a.labels.tif"]
    labels = tifffile.imread(io.BytesIO(files[1][1]))
    assert labels.dtype == np.uint16 and np.array_equal(labels, label_image(masks(), (HEIGHT, WIDTH)))

    image.path.write_bytes(corrupt_strip(photo_tiff("lzw")))  # replaced since: drawing it fails
    outcome, files = results.resumed(image, payload)
    assert files == [] and not outcome.sent
    assert outcome.reason.startswith("done earlier, but the image cannot be drawn or measured: the TIFF page")

    image.result(out).write_text('{"prompts": []}')  # not an answer to an automatic request: sent again
    assert results.earlier(image) is None


@pytest.mark.parametrize("size", [(WIDTH, HEIGHT), (640, 480)])
def test_a_banner_is_a_legible_band_across_the_top_of_the_overlay(tmp_path, size):
    width, height = size
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = image_at(tmp_path / "photo.png", encode(rgb))
    plain, marked = (
        dict(
            Results(tmp_path / "out", banner=banner).answered(image, image.path.read_bytes(), Answer([], None, 2), 0.1)[
                1
            ]
        )
        for banner in (None, SMOKE_BANNER)
    )
    overlay = image.output(tmp_path / "out", ".overlay.png")
    assert marked[overlay] == overlay_png(image.path.read_bytes(), [], banner=SMOKE_BANNER)
    plain_pixels, marked_pixels = (np.asarray(Image.open(io.BytesIO(files[overlay]))) for files in (plain, marked))
    changed = np.flatnonzero((plain_pixels != marked_pixels).any(axis=(1, 2)))
    band = changed.max() + 1
    assert list(changed) == list(range(band)) and 16 <= band <= height // 2  # rows 0..band-1, nothing below
    assert (marked_pixels[:band] == BANNER_FILL).all(axis=2).any(axis=0).all()  # across the whole width
    lettered = (marked_pixels[:band] != BANNER_FILL).any(axis=2).any(axis=1)
    assert lettered.sum() >= 8 and (marked_pixels[:band] == BANNER_TEXT).all(axis=2).any()  # white letters, 8+ px tall
