"""Scientific images in process: TIFF files the tests write with tifffile (12/16-bit, float with NaN,
pages, many channels, compressions, hostile headers) and the intensity mapping to 8 bits."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from harness.files import tiff, tiff_claiming
from sam_fast_serve.common.errors import BadRequest, ConfigError, InvalidOption, PayloadTooLarge, UnsupportedMediaType
from sam_fast_serve.common.intensity import rgb_for_sam, to_uint8
from sam_fast_serve.common.tiff import MAX_PAGES
from sam_fast_serve.server.config import ImageSettings, load_service_config
from sam_fast_serve.server.imaging import decode_image

LIMIT = 50_000_000


def twelve_bit(gray: np.ndarray) -> np.ndarray:
    """An 8-bit picture as a 12-bit camera writes it into 16-bit samples (0..4095)."""
    return (gray.astype(np.uint16) * 16 + 7).astype(np.uint16)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(axis=2).astype(np.uint8)


def test_twelve_bit_in_sixteen_is_stretched_not_black(chelsea):
    samples = twelve_bit(gray_of(chelsea))
    linear = decode_image(tiff(samples), LIMIT, ImageSettings(intensity="linear"))
    assert linear.max() <= 16  # what a linear 65535 -> 255 mapping makes of it: black
    auto = decode_image(tiff(samples), LIMIT)
    assert np.array_equal(auto, rgb_for_sam(samples[:, :, None]))
    assert auto.min() == 0 and auto.max() == 255
    assert np.array_equal(auto[..., 0], auto[..., 2])  # one channel, shown as gray


def test_eight_bit_is_untouched_by_auto(astronaut):
    assert np.array_equal(decode_image(tiff(astronaut, photometric="rgb"), LIMIT), astronaut)


def test_intensity_modes():
    samples = np.array([[[100], [200], [300], [400]]], dtype=np.uint16)
    assert to_uint8(samples, "minmax")[0, :, 0].tolist() == [0, 85, 170, 255]
    assert to_uint8(samples, "linear")[0, :, 0].tolist() == [0, 1, 1, 2]
    stretched = to_uint8(samples, "percentile", (25.0, 75.0))[0, :, 0].tolist()
    assert stretched[0] == 0 and stretched[-1] == 255 and 0 < stretched[1] < stretched[2] < 255
    signed = np.array([[[-32768], [0], [32767]]], dtype=np.int16)
    assert to_uint8(signed, "linear")[0, :, 0].tolist() == [0, 128, 255]


def test_channels_are_stretched_each_on_its_own():
    samples = np.stack([np.arange(16).reshape(4, 4), 1000 * np.arange(16).reshape(4, 4)], axis=-1).astype(np.uint16)
    out = to_uint8(samples, "minmax")
    assert np.array_equal(out[..., 0], out[..., 1])


def test_nan_and_inf_are_left_out_and_become_black():
    samples = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    samples[0, 0], samples[0, 1], samples[0, 2] = np.nan, np.inf, -np.inf
    for mode in ("auto", "linear", "minmax", "percentile"):
        out = decode_image(tiff(samples), LIMIT, ImageSettings(intensity=mode))
        assert out[0, :3].max() == 0, mode
        assert out[-1, -1, 0] == 255, mode  # the statistics ignored the infinities
    nothing_finite = np.full((8, 8), np.nan, np.float32)
    assert decode_image(tiff(nothing_finite), LIMIT).max() == 0


def test_constant_image_is_a_valid_black_image():
    for dtype in (np.uint16, np.float32, np.float64):
        constant = np.full((16, 16), 7, dtype)
        for mode in ("auto", "minmax", "percentile"):
            out = decode_image(tiff(constant), LIMIT, ImageSettings(intensity=mode))
            assert out.shape == (16, 16, 3) and out.max() == 0


def test_float_tiffs_of_both_widths(chelsea):
    gray = gray_of(chelsea)
    for dtype in (np.float32, np.float64):
        samples = gray.astype(dtype) / 255.0
        linear = decode_image(tiff(samples), LIMIT, ImageSettings(intensity="linear"))
        assert np.array_equal(linear[..., 0], gray)


def test_pages_of_a_stack(chelsea):
    gray = gray_of(chelsea)
    stack = np.stack([gray, 255 - gray, gray // 2]).astype(np.uint8)
    data = tiff(stack, photometric="minisblack")  # one page per plane
    for page in range(3):
        assert np.array_equal(decode_image(data, LIMIT, ImageSettings(page=page))[..., 0], stack[page])
    with pytest.raises(InvalidOption, match=r"page 3 does not exist: the TIFF has 3 page\(s\), 0 to 2"):
        decode_image(data, LIMIT, ImageSettings(page=3))


def test_page_of_a_single_page_format(astronaut):
    from harness.files import encode

    with pytest.raises(InvalidOption, match="a PNG image has 1 page"):
        decode_image(encode(astronaut), LIMIT, ImageSettings(page=1))


def test_five_channels(chelsea):
    gray = gray_of(chelsea)
    planes = np.stack([gray, 255 - gray, gray // 2, gray // 3, gray // 4], axis=-1)
    for layout in ("contig", "separate"):
        samples = planes if layout == "contig" else np.moveaxis(planes, -1, 0)
        data = tiff(samples, photometric="minisblack", planarconfig=layout)
        default = decode_image(data, LIMIT)
        assert np.array_equal(default, np.repeat(planes[..., :1], 3, axis=2)), layout  # channel 0, as gray
        chosen = decode_image(data, LIMIT, ImageSettings(channels=(4, 1, 2)))
        assert np.array_equal(chosen, planes[..., [4, 1, 2]]), layout
    with pytest.raises(InvalidOption, match=r"channel\(s\) \[7\] do not exist: the image has 5 channel\(s\)"):
        decode_image(data, LIMIT, ImageSettings(channels=(7,)))


def test_rgba_and_sixteen_bit_rgb(astronaut):
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 9, np.uint8)], axis=-1)
    assert np.array_equal(decode_image(tiff(rgba, photometric="rgb"), LIMIT), astronaut)
    wide = astronaut.astype(np.uint16) * 257
    assert np.array_equal(
        decode_image(tiff(wide, photometric="rgb"), LIMIT, ImageSettings(intensity="linear")), astronaut
    )


@pytest.mark.parametrize("compression", ["zlib", "lzw", "packbits", "zstd", "lzma"])
def test_compressed_tiffs(chelsea, compression):
    samples = twelve_bit(gray_of(chelsea))
    assert np.array_equal(
        decode_image(tiff(samples, compression=compression), LIMIT), decode_image(tiff(samples), LIMIT)
    )


def test_jpeg_in_tiff(astronaut):
    decoded = decode_image(tiff(astronaut, photometric="rgb", compression="jpeg"), LIMIT)
    assert np.abs(decoded.astype(int) - astronaut).mean() < 4  # lossy


def test_huge_declared_size_is_refused_before_decoding():
    with pytest.raises(PayloadTooLarge, match="60000x60000"):
        decode_image(tiff_claiming(60000, 60000), LIMIT)


def test_too_many_pages_is_refused():
    data = tiff(np.zeros((MAX_PAGES + 1, 2, 2), np.uint8), photometric="minisblack")
    with pytest.raises(PayloadTooLarge, match=f"{MAX_PAGES + 1} pages"):
        decode_image(data, LIMIT)


def test_hostile_and_broken_tiffs_are_client_errors():
    good = tiff(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), compression="zlib")
    truncated = good[: len(good) // 2]
    bad_offset = bytearray(good)
    bad_offset[4:8] = struct.pack("<I", 10**9)  # first IFD far past the end
    loop = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HI", 0, 8))  # an IFD pointing at itself
    for body in (truncated, bytes(bad_offset), bytes(loop), b"II*\x00", b"MM\x00*" + b"\xff" * 64):
        with pytest.raises((BadRequest, UnsupportedMediaType, PayloadTooLarge)):
            decode_image(body, LIMIT)


def test_unsupported_sample_types_are_415():
    with pytest.raises(UnsupportedMediaType, match="complex|not supported"):
        decode_image(tiff(np.zeros((8, 8), np.complex64)), LIMIT)


def test_settings_are_checked_in_config_and_request():
    with pytest.raises(ConfigError, match="percentile_low"):
        load_service_config({"percentile_low": 99.9, "percentile_high": 50.0})
    with pytest.raises(ConfigError, match="intensity"):
        load_service_config({"intensity": "gamma"})
    assert load_service_config({"intensity": "minmax", "channels": [2]}).image.channels == (2,)


def test_client_reads_the_size_of_a_tiff_as_the_server_sees_it(tmp_path):
    from sam_fast_serve.client.coco import header_size

    path = tmp_path / "five.tif"
    path.write_bytes(tiff(np.zeros((5, 30, 40), np.uint16), photometric="minisblack", planarconfig="separate"))
    assert header_size(path) == (40, 30)


def test_client_reports_a_broken_tiff_header_as_unreadable(tmp_path):
    from sam_fast_serve.client.coco import header_size

    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 12)
    with pytest.raises(OSError, match="TIFF header"):
        header_size(path)
