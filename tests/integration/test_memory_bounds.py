"""The steps that grow with a request hold at most models.budget's bound an intermediate: masks
upsampled for a large image, the decoder's prompt chunks, the mask head's groups of prompts and the
image encoder's attention bias off the CPU. Each is measured as the largest tensor any torch op
makes during the step, with its CPU speed size lifted (as on a GPU, where only the bound holds) and
a bound that a whole batch would pass several times over; and each gives what the unbounded step
gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from harness.archives import KEEP_ALL
from sam_fast_serve.models import amg, budget, fast_decoder
from sam_fast_serve.models.fast_decoder import FastMaskDecoder, no_mask_dense
from sam_fast_serve.models.prompted import thresholded_masks
from sam_fast_serve.models.registry import model_type
from sam_fast_serve.models.sam1 import build as build_sam1
from sam_fast_serve.models.sam1 import fast_encoder
from sam_fast_serve.models.sam1.automatic import SamAutomaticMaskGenerator
from sam_fast_serve.models.sam2 import build as build_sam2
from sam_fast_serve.models.sam2.predictor import Sam2Predictor
from sam_fast_serve.server.service import MaskService

MiB = 2**20


class LargestTensor(TorchDispatchMode):
    """While in it, `largest` is the most bytes of storage any torch op's output has."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.untyped_storage().nbytes())
        return out


def bound(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the test ends: the steps' bound is `limit` bytes and no CPU speed size applies (as on a GPU)."""
    monkeypatch.setattr(budget, "_bound", limit)
    monkeypatch.setattr(amg, "UPSAMPLE_CPU_BYTES", None)
    monkeypatch.setattr(fast_decoder, "_CPU_CHUNK_BYTES", None)
    monkeypatch.setattr(fast_decoder, "_MASK_HEAD_CPU_BYTES", None)


def largest_in(step: Callable[[], Any]) -> tuple[int, Any]:
    """(the largest tensor's bytes, the result) of `step()`."""
    with torch.inference_mode(), LargestTensor() as measured:
        result = step()
    return measured.largest, result


@pytest.fixture(scope="module")
def sam(random_checkpoint):
    return build_sam1(model_type("test_vit"), str(random_checkpoint)).eval()


@pytest.fixture(scope="module")
def twelve_megapixels(astronaut) -> np.ndarray:
    """The astronaut photo at 4000 x 3000: one mask's float logits take 48 MB."""
    return np.asarray(Image.fromarray(astronaut).resize((4000, 3000), Image.BILINEAR))


def test_upsampling_a_large_image_stays_within_the_bound(sam, twelve_megapixels, monkeypatch):
    """12 masks of 12 MP, 2 within a bound of 100 MiB: each step's floats hold 2 masks (96 MB),
    where one batch held all 12 (576 MB)."""
    generator = SamAutomaticMaskGenerator(sam, points_per_side=2, **KEEP_ALL)
    one_mask = 3000 * 4000 * 4
    bound(100 * MiB, monkeypatch)
    with generator.pinned([twelve_megapixels]):  # the image's embedding: the encoder is not measured
        largest, records = largest_in(lambda: generator.generate(twelve_megapixels))
    assert len(records) == 12
    assert 2 * one_mask <= largest <= 100 * MiB


def test_the_decoders_prompt_chunks_stay_within_the_bound(sam, monkeypatch):
    """32 prompts' image tokens (4 MiB each in float32), 2 a chunk within 8 MiB; the same tokens as
    one chunk of all."""
    decoder = FastMaskDecoder(sam.mask_decoder)
    state, sparse = _prompts(sam, decoder, 32)
    whole = FastMaskDecoder(sam.mask_decoder, prompts_per_chunk=32)
    expected = whole.run_transformer(state, sparse)
    bound(8 * MiB, monkeypatch)
    largest, tokens = largest_in(lambda: decoder.run_transformer(state, sparse))
    assert 8 * MiB // 2 <= largest <= 8 * MiB
    torch.testing.assert_close(tokens.iou_pred, expected.iou_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.mask_tokens, expected.mask_tokens, atol=1e-5, rtol=1e-5)


def test_the_mask_heads_groups_stay_within_the_bound(sam, monkeypatch):
    """Each prompt's upscaled pixels take 8 MiB: 2 prompts a group within 16 MiB, and the pairs'
    logits (any order, repeats, a prompt with 1 pair beside prompts with 3) those of groups of 1
    and of one group of all."""
    decoder = FastMaskDecoder(sam.mask_decoder)
    state, sparse = _prompts(sam, decoder, 8)
    tokens = decoder.run_transformer(state, sparse)
    prompt_idx = torch.tensor([5, 0, 5, 3, 3, 3, 7, 0, 1, 6, 2, 5, 4, 4])
    mask_idx = torch.tensor([1, 0, 2, 3, 1, 0, 2, 0, 3, 1, 1, 1, 0, 3])
    measured = LargestTensor()
    upscaled = decoder._upscaled

    def measuring(*args: Any) -> torch.Tensor:
        with measured:
            return upscaled(*args)

    monkeypatch.setattr(decoder, "_upscaled", measuring)
    results = {}
    for limit in (1, 16 * MiB, 1 << 40):
        measured.largest = 0
        bound(limit, monkeypatch)
        results[limit] = decoder.mask_logits(tokens, prompt_idx, mask_idx)
        if limit == 16 * MiB:
            assert 16 * MiB // 2 < measured.largest <= 16 * MiB
    torch.testing.assert_close(results[16 * MiB], results[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1 << 40], results[1], atol=1e-5, rtol=1e-5)


def test_sam2s_mask_head_adds_its_features_to_every_prompt_of_a_group(random_sam2_checkpoint, monkeypatch):
    """SAM 2's high-resolution features join each prompt of a group: groups of 1 and of all agree."""
    net = build_sam2(model_type("test_sam2.1_hiera"), str(random_sam2_checkpoint)).eval()
    predictor = Sam2Predictor(net, torch.float32)
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    coords = predictor.model_coords(torch.tensor([[[10.0, 20.0]], [[100.0, 50.0]], [[64.0, 64.0]], [[5.0, 90.0]]]))
    labels = torch.ones(4, 1, dtype=torch.int)
    results = []
    for limit in (1, 1 << 40):
        bound(limit, monkeypatch)
        results.append(predictor.decode(coords, labels, multimask=True)[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_the_encoders_attention_bias_stays_within_the_bound(monkeypatch):
    """The (N, L, L) bias of 4 heads over 32 x 32 tokens takes 16 MiB in float32: made 1 MiB at a
    time, the attention is the one of the whole mask."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 1024, 8, generator=generator) for _ in range(3))
    rel_pos = (torch.randn(4, 1024, 32, generator=generator), torch.randn(4, 1024, 32, generator=generator))
    bound(1 << 40, monkeypatch)
    expected = fast_encoder._attend_sdpa(q, k, v, 0.35, rel_pos)
    bound(MiB, monkeypatch)
    largest, got = largest_in(lambda: fast_encoder._attend_sdpa(q, k, v, 0.35, rel_pos))
    assert MiB // 2 <= largest <= MiB
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_chunk", [1, 2, 6])
def test_prompted_masks_are_thresholded_a_chunk_at_a_time(per_chunk):
    """The same masks as thresholding all logits at once, column-major as the RLE encoder reads them."""
    low_res = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def upsample(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(logits, (40, 30), mode="bilinear", align_corners=False)

    masks = thresholded_masks(upsample, low_res, 0.0, (40, 30), per_chunk)
    assert masks.shape == (2, 3, 40, 30) and masks.dtype == torch.bool
    assert torch.equal(masks, upsample(low_res.flatten(0, 1)[:, None]).view(2, 3, 40, 30) > 0)
    assert masks.flatten(0, 1).transpose(1, 2).is_contiguous()


def _prompts(sam, decoder: FastMaskDecoder, count: int) -> tuple[fast_decoder.ImageState, torch.Tensor]:
    """The decoder's state of a random image embedding, and `count` one-point prompts' sparse embeddings."""
    generator = torch.Generator().manual_seed(2)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    coords = torch.rand(count, 1, 2, generator=generator) * 1024
    with torch.inference_mode():
        prompt_encoder = sam.prompt_encoder
        sparse, _ = prompt_encoder(points=(coords, torch.ones(count, 1, dtype=torch.int)), boxes=None, masks=None)
        state = decoder.prepare_image(embedding, prompt_encoder.get_dense_pe(), no_mask_dense(prompt_encoder))
    return state, sparse


def test_a_worker_takes_its_bound_from_the_handler_key(random_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "_bound", budget._bound)
    (tmp_path / random_checkpoint.name).symlink_to(random_checkpoint)
    section = {"model_type": "test_vit", "sam_checkpoint": random_checkpoint.name, "max_chunk_bytes": 64 * MiB}
    MaskService.load(section, tmp_path, None)
    assert budget.chunk_bytes(torch.device("cpu")) == 64 * MiB
