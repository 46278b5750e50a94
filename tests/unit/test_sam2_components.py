"""`connected_components` and `fill_holes_and_sprinkles` against scipy.ndimage, and against SAM 2's own
post-processing, both as it behaves without its `_C` extension (it skips with a warning) and with our
`connected_components` standing in for the kernel (`labelling_sam2s_own`)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from harness.components import EIGHT, reference_components
from sam_fast_serve.models.sam2.components import (
    connected_components,
    fill_holes_and_sprinkles,
    labelling_sam2s_own,
    small_components,
)

FOUR = ndi.generate_binary_structure(2, 1)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images group the same pixels together (and agree on which are background)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def random_masks(rng: np.random.Generator, n: int, height: int, width: int, density: float) -> np.ndarray:
    if density in (0.0, 1.0):
        return np.full((n, 1, height, width), bool(density))
    noise = rng.random((n, 1, height, width))
    if min(height, width) >= 8:
        # Smoothed noise gives blobs with holes and specks as well as pixel-sized bits.
        noise = ndi.gaussian_filter(noise, sigma=(0, 0, 1.5, 1.5))
        return noise > np.quantile(noise, 1 - density)
    return noise < density


def check_against_reference(mask: np.ndarray, as_uint8: bool = False) -> None:
    tensor = torch.from_numpy(mask.astype(np.uint8) if as_uint8 else mask)
    labels, counts = connected_components(tensor)
    assert labels.dtype == torch.int32 and counts.dtype == torch.int32
    assert labels.shape == counts.shape == mask.shape
    assert labels.device == counts.device == tensor.device
    want_labels, want_counts = reference_components(mask.astype(bool))
    for i in range(mask.shape[0]):
        assert same_partition(labels[i, 0].numpy(), want_labels[i, 0])
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    np.testing.assert_array_equal(labels.numpy(), want_labels)


SIZES = [(1, 1), (1, 7), (6, 1), (2, 2), (3, 5), (16, 16), (17, 31), (64, 48)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("as_uint8", [False, True])
def test_components_match_scipy(height: int, width: int, density: float, as_uint8: bool) -> None:
    rng = np.random.default_rng([height, width, int(density * 10), as_uint8])
    check_against_reference(random_masks(rng, 5, height, width, density), as_uint8)


def test_components_large_batch() -> None:
    rng = np.random.default_rng(1)
    check_against_reference(random_masks(rng, 8, 256, 256, 0.5))


def test_full_and_empty_masks() -> None:
    mask = np.zeros((2, 1, 4, 6), dtype=bool)
    mask[1] = True
    labels, counts = connected_components(torch.from_numpy(mask))
    assert (labels[0] == 0).all() and (counts[0] == 0).all()
    assert (labels[1] == 1).all() and (counts[1] == 24).all()


@pytest.mark.parametrize("flip", [False, True])
def test_diagonal_is_one_component(flip: bool) -> None:
    line = np.eye(7, dtype=bool)
    if flip:
        line = line[:, ::-1].copy()
    mask = line[None, None]
    labels, counts = connected_components(torch.from_numpy(mask))
    assert len(np.unique(labels.numpy()[mask])) == 1
    assert (counts.numpy()[mask] == 7).all()
    assert (counts.numpy()[~mask] == 0).all()
    # The reference itself must tell the two connectivities apart, or the test above would prove little.
    assert ndi.label(line, structure=FOUR)[1] == 7
    assert ndi.label(line, structure=EIGHT)[1] == 1
    check_against_reference(mask)


def test_numbering_by_hand() -> None:
    # Worked out from the kernel: the label is 1 + the flat index of the top-left corner of the first 2x2
    # block that holds the component, which need not be the block of its first pixel in raster order.
    mask = np.zeros((1, 1, 4, 4), dtype=bool)
    mask[0, 0, 3, 3] = True  # block corner (2, 2) -> 2 * 4 + 2 + 1
    mask[0, 0, 0, 2] = mask[0, 0, 1, 1] = True  # first pixel in block (0, 2), but also in block (0, 0) -> 1
    labels, counts = connected_components(torch.from_numpy(mask))
    assert labels[0, 0, 3, 3] == 11 and counts[0, 0, 3, 3] == 1
    assert labels[0, 0, 0, 2] == labels[0, 0, 1, 1] == 1 and counts[0, 0, 0, 2] == 2


def test_uint8_nonzero_is_foreground() -> None:
    mask = torch.tensor([[[[0, 255, 7], [0, 0, 1]]]], dtype=torch.uint8)
    labels, counts = connected_components(mask)
    assert counts.tolist() == [[[[0, 3, 3], [0, 0, 3]]]]
    assert labels.tolist() == [[[[0, 1, 1], [0, 0, 1]]]]


def test_bad_input() -> None:
    with pytest.raises(TypeError):
        connected_components(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError):
        connected_components(torch.zeros(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        connected_components(torch.zeros(4, 4, dtype=torch.bool))
    labels, counts = connected_components(torch.zeros(0, 1, 4, 4, dtype=torch.bool))
    assert labels.shape == counts.shape == (0, 1, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip() -> None:
    mask = random_masks(np.random.default_rng(2), 3, 32, 32, 0.5)
    labels, counts = connected_components(torch.from_numpy(mask).cuda())
    assert labels.is_cuda and counts.is_cuda
    want_labels, want_counts = reference_components(mask)
    np.testing.assert_array_equal(labels.cpu().numpy(), want_labels)
    np.testing.assert_array_equal(counts.cpu().numpy(), want_counts)


def reference_fill(logits: np.ndarray, threshold: float, max_hole: float, max_sprinkle: float) -> np.ndarray:
    """Small background components become foreground (threshold + 10), then small foreground components of
    the input become background (threshold - 10), plane by plane with scipy."""
    out = logits.astype(np.float32)
    for b, c in np.ndindex(*logits.shape[:2]):
        fg = logits[b, c] > threshold
        for on, max_area, value in ((~fg, max_hole, threshold + 10.0), (fg, max_sprinkle, threshold - 10.0)):
            if max_area <= 0:
                continue
            lab, _ = ndi.label(on, structure=EIGHT)
            area = np.bincount(lab.ravel())
            small = (lab > 0) & (area[lab] <= max_area)
            out[b, c][small] = np.float32(value)
    return out


def random_logits(seed: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    noise = np.random.default_rng(seed).standard_normal(shape)
    noise = ndi.gaussian_filter(noise, sigma=(0, 0, 1.2, 1.2)) * 8
    return torch.from_numpy(noise.astype(np.float32))


@pytest.mark.parametrize("shape", [(3, 2, 64, 64), (2, 3, 31, 17)])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
@pytest.mark.parametrize("max_hole,max_sprinkle", [(0, 0), (12, 0), (0, 7.5), (25, 25), (100.0, 3)])
def test_fill_matches_scipy(
    shape: tuple[int, int, int, int], threshold: float, max_hole: float, max_sprinkle: float
) -> None:
    logits = random_logits(sum(shape), shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fill_holes_and_sprinkles(logits, threshold, max_hole, max_sprinkle)
    want = reference_fill(logits.numpy(), threshold, max_hole, max_sprinkle)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    changed = (got != logits).numpy()
    np.testing.assert_array_equal(changed, want != logits.numpy())
    np.testing.assert_array_equal(got.numpy(), want)
    if max_hole > 0:
        assert (changed & (logits.numpy() <= threshold)).any()
    if max_sprinkle > 0:
        assert (changed & (logits.numpy() > threshold)).any()
    if max_hole == max_sprinkle == 0:
        assert not changed.any()
    else:
        assert not changed.all()


def test_fill_keeps_speck_area_of_input() -> None:
    # A ring of 8 pixels around a 1-pixel hole: SAM 2 measures the ring before the hole is filled, so a
    # sprinkle limit of 8 removes the ring and leaves the filled hole as a single foreground pixel.
    logits = torch.full((1, 1, 6, 6), -1.0)
    logits[0, 0, 1:4, 1:4] = 1.0
    logits[0, 0, 2, 2] = -1.0
    got = fill_holes_and_sprinkles(logits, 0.0, 1, 8)
    assert (got > 0).sum() == 1 and got[0, 0, 2, 2] == 10.0


def test_fill_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        fill_holes_and_sprinkles(torch.zeros(4, 4), 0.0, 1, 1)


def hole_logits() -> torch.Tensor:
    logits = torch.full((1, 1, 16, 16), 5.0)
    logits[0, 0, 6:8, 6:9] = -5.0  # a 6-pixel hole
    return logits


def test_sam2_without_c_skips_what_we_fill() -> None:
    pytest.importorskip("sam2")
    from sam2.utils.transforms import SAM2Transforms

    try:
        import sam2._C  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("sam2._C is built here: SAM 2 does not skip")
    transforms = SAM2Transforms(1024, 0.0, max_hole_area=8, max_sprinkle_area=0, disable_torch_jit=True)
    logits = hole_logits()
    with pytest.warns(UserWarning, match="Skipping the post-processing"):
        theirs = transforms.postprocess_masks(logits, (16, 16))
    ours = F.interpolate(fill_holes_and_sprinkles(logits, 0.0, 8, 0), (16, 16), mode="bilinear", align_corners=False)
    # Resizing to the same size changes nothing, so SAM 2's output is its input: the hole is still there.
    assert torch.equal(theirs, logits)
    assert (ours > 0).all()
    assert not torch.equal(theirs, ours)


@pytest.mark.parametrize("max_hole,max_sprinkle", [(8, 0), (0, 6), (20, 10)])
def test_sam2_with_our_components_agrees(max_hole: float, max_sprinkle: float) -> None:
    pytest.importorskip("sam2")
    from sam2.utils.transforms import SAM2Transforms

    transforms = SAM2Transforms(1024, 0.0, max_hole, max_sprinkle, disable_torch_jit=True)
    logits = random_logits(7, (2, 3, 32, 32))
    with warnings.catch_warnings(), labelling_sam2s_own():
        warnings.simplefilter("error")
        theirs = transforms.postprocess_masks(logits, (48, 40))
    filled = fill_holes_and_sprinkles(logits, 0.0, max_hole, max_sprinkle)
    assert not torch.equal(filled, logits)
    ours = F.interpolate(filled, (48, 40), mode="bilinear", align_corners=False)
    assert torch.equal(theirs, ours)
    import sam2.utils.misc

    assert sam2.utils.misc.get_connected_components is not connected_components  # only while in it


@pytest.mark.parametrize("max_area", [1, 2, 5, 8, 30])
@pytest.mark.parametrize("height,width", [(1, 1), (3, 5), (17, 31), (64, 48)])
def test_small_components_are_those_of_connected_components(max_area: int, height: int, width: int) -> None:
    """The device's answer (here on the CPU) is the labelling's: every pixel of every component of at most
    `max_area` pixels, and no pixel of a larger one (long thin components included)."""
    rng = np.random.default_rng(max_area * 1000 + height * width)
    for density in (0.05, 0.3, 0.5, 0.9):
        mask = torch.from_numpy(random_masks(rng, 3, height, width, density))
        labels, counts = connected_components(mask)
        want = (labels > 0) & (counts <= max_area)
        assert torch.equal(small_components(mask, max_area), want)


def test_small_components_tell_a_long_snake_from_its_parts() -> None:
    """A one-pixel-wide snake of 33 pixels: after 7 steps its pixels hold many different indices, none of
    whose parts is a component of at most 8 pixels."""
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    mask[0, 0, 0::4, :] = True
    mask[0, 0, 1:4, 8] = True
    mask[0, 0, 5:8, 0] = True
    assert not small_components(mask, 8).any()
    assert small_components(mask, 45).sum() == mask.sum()


def test_labelling_sam2s_own_leaves_the_video_predictors_filling_as_it_found_it() -> None:
    from sam2 import sam2_video_predictor

    original = sam2_video_predictor.fill_holes_in_mask_scores
    with labelling_sam2s_own():
        # On the CPU the video predictor fills as before, labelled by ours.
        filled = sam2_video_predictor.fill_holes_in_mask_scores(hole_logits(), 8)
    assert sam2_video_predictor.fill_holes_in_mask_scores is original
    assert (filled > 0).all()


def test_the_device_path_fills_as_the_labelling_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """What CUDA runs (`small_components` in both fillings), run here on the CPU: the same logits."""
    from sam2 import sam2_video_predictor

    from sam_fast_serve.models.sam2 import components

    logits = random_logits(11, (2, 3, 32, 32))
    scores = logits.flatten(0, 1).unsqueeze(1)
    expected = fill_holes_and_sprinkles(logits, 0.0, 8, 5)
    with labelling_sam2s_own():
        expected_video = sam2_video_predictor.fill_holes_in_mask_scores(scores, 8)
    monkeypatch.setattr(components, "_on_device", lambda mask, max_area: max_area <= components.DEVICE_AREA)
    assert torch.equal(fill_holes_and_sprinkles(logits, 0.0, 8, 5), expected)
    with labelling_sam2s_own():
        assert torch.equal(sam2_video_predictor.fill_holes_in_mask_scores(scores, 8), expected_video)
    assert not torch.equal(expected_video, scores)
