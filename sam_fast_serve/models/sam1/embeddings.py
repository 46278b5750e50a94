"""SAM 1 image embeddings, computed in batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from sam_fast_serve.models.embedding import ImageEmbedding


@torch.no_grad()
def encode_images(sam: Sam, images: Sequence[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
    """Run the image encoder on RGB uint8 (H, W, 3) images, `batch_size` images per call.

    Preprocessing is segment_anything's own (resize long side to 1024, normalise, pad), so the
    embeddings equal SamPredictor.set_image's.
    """
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = sam.pixel_mean.device
    dtype = next(sam.image_encoder.parameters()).dtype
    results: list[ImageEmbedding] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs: list[torch.Tensor] = []
        sizes: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for image in chunk:
            resized = torch.as_tensor(transform.apply_image(image), device=device)
            resized = resized.permute(2, 0, 1).contiguous()[None, :, :, :]
            sizes.append(((resized.shape[-2], resized.shape[-1]), (image.shape[0], image.shape[1])))
            inputs.append(sam.preprocess(resized))
        features = sam.image_encoder(torch.cat(inputs).to(dtype))
        results.extend(
            ImageEmbedding({"features": features[i : i + 1].clone()}, input_size, original_size)
            for i, (input_size, original_size) in enumerate(sizes)
        )
    return results
