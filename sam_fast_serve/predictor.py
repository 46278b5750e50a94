"""A SamPredictor whose image embeddings can come from a batch or a store, decoding with FastMaskDecoder."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from .embeddings import EmbeddingCache, ImageEmbedding, encode_images, pixel_key
from .fast_decoder import FastMaskDecoder, ImageState
from .store import EmbeddingStore
from .timing import StageClock
from .upsampling import postprocess_masks


class FastSamPredictor(SamPredictor):
    """SamPredictor plus: embeddings looked up by pixel key before the encoder runs, and the
    per-image part of the mask decoder done once in `set_embedding`.

    `store` keeps embeddings across requests (and workers, when it is shared); `pinned` (filled by
    `pin`) holds the embeddings of the images of the batch being served, whatever the store keeps.
    `clock` gathers the seconds spent in the embedding store, the image encoder and the mask decoder.
    """

    def __init__(self, sam: Sam, decoder: FastMaskDecoder, store: EmbeddingStore | None = None) -> None:
        super().__init__(sam)
        self.decoder = decoder
        self.store = store if store is not None else EmbeddingStore(EmbeddingCache(0))
        self.pinned: dict[str, ImageEmbedding] = {}
        self.decoder_state: ImageState | None = None
        self.encoder_calls = 0
        self.clock = StageClock(self.device)

    def lookup(self, key: str) -> ImageEmbedding | None:
        """The embedding of the image with `pixel_key` `key`, if it is pinned or cached."""
        pinned = self.pinned.get(key)
        if pinned is not None:
            return pinned
        with self.clock.stage("embedding_store"):
            return self.store.get(key, self.device)

    def fetch(self, key: str) -> ImageEmbedding | None:
        """The stored embedding of `key` (EmbeddingStore.fetch: ServiceUnavailable when the shared
        store cannot answer)."""
        with self.clock.stage("embedding_store"):
            return self.store.fetch(key, self.device)

    def _encode(self, images: list[np.ndarray], keys: list[str], batch_size: int) -> list[ImageEmbedding]:
        """Run the encoder on `images` and keep each embedding under its key."""
        self.encoder_calls += -(-len(images) // batch_size)
        with self.clock.stage("image_encoder"):
            embeddings = encode_images(self.model, images, batch_size)
        with self.clock.stage("embedding_store"):
            for key, embedding in zip(keys, embeddings, strict=True):
                self.store.put(key, embedding)
        return embeddings

    def pin(self, images: list, batch_size: int) -> None:
        """Encode the images not yet known, `batch_size` per encoder call, and pin all of them."""
        keys = [pixel_key(image) for image in images]
        # One lookup per distinct image: with a shared store each one may be a Redis read.
        known = {key: self.lookup(key) for key in dict.fromkeys(keys)}
        missing = {key: image for key, image in zip(keys, images) if known[key] is None}
        if missing:
            known.update(zip(missing, self._encode(list(missing.values()), list(missing), batch_size)))
        self.pinned.update({key: embedding for key, embedding in known.items() if embedding is not None})

    def unpin(self) -> None:
        self.pinned.clear()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Like SamPredictor.set_image (RGB uint8 HWC), reusing a pinned or cached embedding."""
        if image_format != "RGB":
            image = image[..., ::-1]
        key = pixel_key(image)
        embedding = self.lookup(key)
        if embedding is None:
            (embedding,) = self._encode([image], [key], 1)
        self.set_embedding(embedding)

    @torch.no_grad()
    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make `embedding` the current image and run the decoder's once-per-image work."""
        self.reset_image()
        self.features = embedding.features
        self.input_size = embedding.input_size
        self.original_size = embedding.original_size
        prompt_encoder = self.model.prompt_encoder
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, *prompt_encoder.image_embedding_size
        )
        with self.clock.stage("mask_decoder"):
            self.decoder_state = self.decoder.prepare_image(self.features, prompt_encoder.get_dense_pe(), dense)
        self.is_image_set = True

    def image_state(self) -> ImageState:
        """The decoder's per-image state of the current image (RuntimeError when none is set)."""
        if self.decoder_state is None:
            raise RuntimeError("An image must be set with .set_image(...) or .set_embedding(...) first.")
        return self.decoder_state

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SamPredictor.predict_torch (same arguments and outputs) through the fast decoder.

        Returns masks (B, C, H, W), their predicted IoUs (B, C) and low-res logits (B, C, 256, 256),
        C = 3 with multimask_output, else 1. A mask_input changes the dense embedding per prompt,
        which the fast decoder shares per image, so that case uses segment_anything's decoder.
        """
        if mask_input is not None:
            return super().predict_torch(point_coords, point_labels, boxes, mask_input, multimask_output, return_logits)
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, _ = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
        mask_ids = torch.arange(1, 4) if multimask_output else torch.arange(0, 1)
        count = len(mask_ids)
        prompt_idx = torch.arange(sparse.shape[0]).repeat_interleave(count)
        with self.clock.stage("mask_decoder"):
            tokens = self.decoder.run_transformer(self.image_state(), sparse)
            low_res = self.decoder.mask_logits(
                tokens, prompt_idx.to(sparse.device), mask_ids.repeat(sparse.shape[0]).to(sparse.device)
            )
        low_res = low_res.view(sparse.shape[0], count, *low_res.shape[-2:])
        masks = self.upsample(low_res)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, tokens.iou_pred[:, mask_ids.to(sparse.device)], low_res

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, C, 256, 256) low-res logits of the set image -> (B, C, H, W) float32 logits at its
        original size: `Sam.postprocess_masks`, as two matrix products where they pay."""
        return postprocess_masks(self.model, low_res, self.input_size, self.original_size)

    def reset_image(self) -> None:
        super().reset_image()
        self.decoder_state = None
