"""SAM 3's predictor: an image's features once, then every instance of each concept on it, and
the masks of point, box and mask prompts on it (tracker.py, where the checkpoint has the tracker).

The same computation as transformers' Sam3Model + Sam3Processor (resize to the model's square,
the vision trunk and neck, the text encoder, the DETR encoder and decoder, the mask decoder,
`post_process_instance_segmentation`), arranged so that nothing per concept depends on the image
alone, and nothing is computed that no answer uses:

- the image's part is computed once and kept in the embedding store (`embedding_layout`): the
  neck's three levels the detector reads, with the pixel decoder's convolutions of the two finer
  levels already applied (pixel.py), so a concept on a cached image runs no image-sized work
  that the image alone decides;
- the neck's fourth level (scale 0.5), which the detector never reads, is not computed;
- a phrase's text features are computed from its real tokens only (the text encoder is causal:
  the padding changes none of them) and kept per phrase;
- all the concepts of a request go through the detector as one batch;
- masks are made for the instances kept only, with the instance projection folded into the
  queries' mask embeddings; the semantic head, which no answer uses, is not run.

The tracker's image part (tracker.py) is computed with the detector's from the same trunk tokens
and kept in the same embedding. Inputs are RGB uint8 images and validated Concepts
(common.concepts) or Prompts (common.prompts); outputs are the records.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid
from transformers.models.sam3.processing_sam3 import box_xyxy_to_cxcywh

from sam_fast_serve.common.concepts import Concepts
from sam_fast_serve.common.errors import InvalidOption
from sam_fast_serve.common.prompts import Prompts
from sam_fast_serve.common.records import concept_record, rle_to_builtins
from sam_fast_serve.models.amg import upsample_chunk
from sam_fast_serve.models.embedding import EmbeddingCache, EmbeddingKeeper, EmbeddingStore, ImageEmbedding
from sam_fast_serve.models.prompted import segment_prompts
from sam_fast_serve.models.rle import encode_masks, rle_areas
from sam_fast_serve.models.sam3 import detr, tracker
from sam_fast_serve.models.sam3.build import Sam3Net
from sam_fast_serve.models.sam3.detr import flattened
from sam_fast_serve.models.sam3.pixel import PixelDecoder
from sam_fast_serve.models.sam3.tracker import TrackerHead
from sam_fast_serve.models.timing import StageClock
from sam_fast_serve.models.upsampling import bilinear

# The detector reads the neck's first three levels (Sam3Model.forward drops the last).
LEVELS = 3
# Phrases whose features are kept (a few KB each).
TEXT_CACHE = 256


def embedding_layout(net: Sam3Net) -> dict[str, tuple[int, ...]]:
    """The tensors of one image's embedding: the neck's levels 0-2 as the detector takes them
    (pixel.py: levels 0 and 1 with the pixel decoder's convolutions applied), the DETR encoder's
    first self-attention of level 2's tokens (detr.py), and the tracker's (tracker.layout) where
    the net has it."""
    config: Any = net.model.config.vision_config
    side = config.image_size // config.backbone_config.patch_size
    channels = config.fpn_hidden_size
    layout: dict[str, tuple[int, ...]] = {
        f"level_{i}": (1, channels, side * 4 >> i, side * 4 >> i) for i in range(LEVELS)
    }
    detr_config: Any = net.model.config.detr_encoder_config
    layout["detr_first"] = (1, side * side, detr_config.hidden_size)
    if net.video is not None:
        layout.update(tracker.layout(net))
    return layout


class Sam3Predictor(EmbeddingKeeper):
    """The current image's features, every instance of each concept on it, and the masks of
    prompts on it (where the net has the tracker).

    `dtype` is what the model computes in (autocast off float32) and what embeddings are kept in;
    `store`, `pinned` and `clock` as in EmbeddingKeeper.
    """

    def __init__(self, net: Sam3Net, dtype: torch.dtype, store: EmbeddingStore | None = None) -> None:
        assert net.trunk is not None, "a prepared net (sam3.build.prepare)"
        self.net = net
        self.model = net.model
        self.trunk = net.trunk
        self.dtype = dtype
        self.device = net.device
        self.store = store if store is not None else EmbeddingStore(EmbeddingCache(0))
        self.pinned: dict[str, ImageEmbedding] = {}
        self.clock = StageClock(self.device)
        self.pixels = PixelDecoder(self.model.mask_decoder.pixel_decoder)
        self.texts: OrderedDict[str, Tensor] = OrderedDict()
        self.tracker = None if net.video is None else TrackerHead(net)
        self.levels: list[Tensor] | None = None
        self.tracked: dict[str, Tensor] = {}
        self.first: Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        config: Any = self.model.config
        self.side = config.vision_config.image_size
        self.patch = config.vision_config.backbone_config.patch_size
        # The text encoder's positions: the most tokens a phrase may have, its two ends included.
        self.text_tokens = config.text_config.max_position_embeddings

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.inference_mode()
    def encode_images(self, images: list[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
        vision = self.model.vision_encoder
        results: list[ImageEmbedding] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            # Channels last, said: the processor guesses the layout, wrongly for an image 1 or 3 pixels tall.
            pixels = self.net.processor.image_processor(
                images=chunk, return_tensors="pt", input_data_format="channels_last"
            )["pixel_values"]
            with self._autocast():
                trunk = self.trunk(pixels.to(self.device))
                grid = pixels.shape[-1] // self.patch
                spatial = trunk.view(len(chunk), grid, grid, -1).permute(0, 3, 1, 2)
                levels = [vision.neck.fpn_layers[i](spatial) for i in range(LEVELS)]
                levels[:2] = self.pixels.image_part(levels[:2])
                positions = vision.neck.position_encoding(levels[2].shape, self.device, levels[2].dtype)
                first = detr.image_part(self.model.detr_encoder, flattened(levels[2]), flattened(positions))
                tracked = {} if self.tracker is None else self.tracker.image_part(spatial)
            for i, image in enumerate(chunk):
                kept = {f"level_{k}": t[i : i + 1].to(self.dtype).clone() for k, t in enumerate(levels)}
                kept["detr_first"] = first[i : i + 1].to(self.dtype).clone()
                kept.update({name: t[i : i + 1].to(self.dtype).clone() for name, t in tracked.items()})
                results.append(ImageEmbedding(kept, (self.side, self.side), (image.shape[0], image.shape[1])))
        return results

    def set_image(self, image: np.ndarray) -> None:
        """Make the RGB uint8 `image` current, reusing a pinned or cached embedding."""
        self.set_pixels(image)

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        self.levels = [embedding[f"level_{i}"] for i in range(LEVELS)]
        self.first = embedding["detr_first"]
        self.tracked = {name: embedding[name] for name in tracker.NAMES if name in embedding.tensors}
        self.original_size = embedding.original_size

    def segment_prompts(self, prompts: Prompts) -> list[dict[str, Any]]:
        """The answer to `prompts` on the current image (models.prompted.segment_prompts)."""
        return segment_prompts(self, prompts)

    def predict_prompts(self, prompts: Prompts) -> tuple[Tensor, Tensor, Tensor]:
        """The tracker's masks, IoUs and low-res logits of `prompts` (models.prompted.PromptPredictor)."""
        if self.tracker is None or not self.tracked or self.original_size is None:
            raise RuntimeError("A net with the tracker and an image set first.")
        with self.clock.stage("mask_decoder"):
            return self.tracker.predict(self.tracked, prompts, self.original_size)

    def _tokens(self, phrase: str) -> Tensor:
        ids = self.net.processor.tokenizer(phrase)["input_ids"]
        if len(ids) > self.text_tokens:
            raise InvalidOption(
                f"'text' phrase {phrase[:40]!r} is {len(ids)} tokens; SAM 3's text encoder takes at most "
                f"{self.text_tokens} (its two ends included): shorten it"
            )
        return torch.tensor([ids], device=self.device)

    def text_features(self, phrases: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """(K, L, C) projected text features of the phrases, padded to the longest, and their (K, L)
        validity mask. Every phrase is checked before any is encoded (InvalidOption)."""
        tokens = {phrase: self._tokens(phrase) for phrase in phrases if phrase not in self.texts}
        for phrase in phrases:
            if phrase in self.texts:
                self.texts.move_to_end(phrase)
        for phrase, ids in tokens.items():
            with self._autocast():
                hidden = self.model.text_encoder(input_ids=ids).last_hidden_state
                self.texts[phrase] = self.model.text_projection(hidden)[0]
        features = [self.texts[phrase] for phrase in phrases]
        # Evicted after the lookup: a request's own phrases are the newest, and all of them are read.
        while len(self.texts) > max(TEXT_CACHE, len(phrases)):
            self.texts.popitem(last=False)
        longest = max(len(f) for f in features)
        padded = features[0].new_zeros(len(features), longest, features[0].shape[-1])
        mask = torch.zeros(len(features), longest, dtype=torch.bool, device=self.device)
        for k, f in enumerate(features):
            padded[k, : len(f)] = f
            mask[k, : len(f)] = True
        return padded, mask

    def _exemplars(self, concepts: Concepts, level: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The geometry encoder's features (1, B + 1, C) and mask of the exemplar boxes, from the
        neck's level 2 and its positions (the only level it reads), boxes normalized as
        Sam3Processor normalizes them (cx, cy, w, h in fractions of the image)."""
        assert concepts.boxes is not None and concepts.labels is not None and self.original_size is not None
        height, width = self.original_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
        boxes = box_xyxy_to_cxcywh(torch.tensor(concepts.boxes, dtype=torch.float32, device=self.device) / scale)
        labels = torch.tensor(concepts.labels, device=self.device)
        geometry = self.model.geometry_encoder(
            box_embeddings=boxes[None],
            box_mask=torch.ones(1, len(labels), dtype=torch.bool, device=self.device),
            box_labels=labels[None],
            img_feats=(level,),
            img_pos_embeds=(positions,),
        )
        return geometry.last_hidden_state, geometry.attention_mask

    @torch.inference_mode()
    def segment_concepts(self, concepts: Concepts, max_masks: int) -> list[dict[str, Any]]:
        """The records of every instance of each of `concepts` on the current image (module doc), at
        most `max_masks` in all (the best by score, chosen before any mask is made)."""
        if self.levels is None or self.first is None or self.original_size is None:
            raise RuntimeError("An image must be set with .set_image(...) or .set_embedding(...) first.")
        model = self.model
        count = len(concepts.texts)
        with self.clock.stage("mask_decoder"), self._autocast():
            levels = [level.to(self.dtype) for level in self.levels]
            positions = model.vision_encoder.neck.position_encoding(levels[2].shape, self.device, levels[2].dtype)
            prompt, mask = self.text_features(concepts.texts)
            if concepts.boxes is not None:
                geometry, geometry_mask = self._exemplars(concepts, levels[2], positions)
                prompt = torch.cat([prompt, geometry.to(prompt.dtype).expand(count, -1, -1)], dim=1)
                mask = torch.cat([mask, geometry_mask.bool().expand(count, -1)], dim=1)
            tokens = flattened(positions).expand(count, -1, -1)
            first = self.first.to(self.dtype).expand(count, -1, -1)
            encoded = detr.concept_part(model.detr_encoder, first, tokens, prompt, mask)
            decoded = model.detr_decoder(
                vision_features=encoded,
                text_features=prompt,
                vision_pos_encoding=tokens,
                text_mask=mask,
                spatial_shapes=torch.tensor([levels[2].shape[-2:]], device=self.device),
            )
            queries = decoded.intermediate_hidden_states[-1:]
            offsets = model.detr_decoder.box_head(queries)
            boxes = box_cxcywh_to_xyxy((inverse_sigmoid(decoded.reference_boxes[-1:]) + offsets).sigmoid())[0]
            logits = model.dot_product_scoring(decoder_hidden_states=queries, text_features=prompt, text_mask=mask)
            scores = (logits[0, ..., 0].sigmoid() * decoded.presence_logits[-1].sigmoid()).float()
        records: list[dict[str, Any]] = []
        for k, kept in enumerate(self._kept(scores, concepts, max_masks)):
            if not len(kept):
                continue
            # One concept's pixel embedding at a time: 85 MB each at full size in float32.
            with self.clock.stage("mask_decoder"), self._autocast():
                pixel_embed = self.pixels.concept_part(
                    model.mask_decoder, encoded[k : k + 1], levels, prompt[k : k + 1], mask[k : k + 1]
                )
                masks = self.pixels.masks(model.mask_decoder, queries[0, k, kept], pixel_embed[0])
            records.extend(self._records(concepts.texts[k], masks, scores[k, kept], boxes[k, kept], concepts))
        return records

    @staticmethod
    def _kept(scores: Tensor, concepts: Concepts, max_masks: int) -> list[Tensor]:
        """Each concept's kept queries, best first: above the threshold, at most max_instances of
        each, and at most `max_masks` in all (the best across concepts)."""
        kept = []
        for row in scores:
            order = torch.argsort(row, descending=True, stable=True)
            order = order[row[order] > concepts.threshold]
            kept.append(order if concepts.max_instances is None else order[: concepts.max_instances])
        if sum(len(order) for order in kept) > max_masks:
            ranked = sorted(
                (-float(scores[k, query]), k, i)
                for k, order in enumerate(kept)
                for i, query in enumerate(order.tolist())
            )
            chosen = {(k, i) for _, k, i in ranked[:max_masks]}
            kept = [order[[i for i in range(len(order)) if (k, i) in chosen]] for k, order in enumerate(kept)]
        return kept

    def _records(
        self, phrase: str, logits: Tensor, scores: Tensor, boxes: Tensor, concepts: Concepts
    ) -> list[dict[str, Any]]:
        """One concept's kept instances as records: mask probabilities resized to the image (as
        Sam3Processor does: bilinear, then > mask_threshold), COCO RLE, area, the predicted box as
        XYWH in image pixels, the score."""
        assert self.original_size is not None
        height, width = self.original_size
        per_chunk = upsample_chunk(self.device, height * width)
        rles: list[dict[str, Any]] = []
        with self.clock.stage("postprocess"):
            for start in range(0, len(logits), per_chunk):
                probabilities = logits[start : start + per_chunk].float().sigmoid()
                rles.extend(encode_masks(bilinear(probabilities, (height, width)) > concepts.mask_threshold))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        pixels_xyxy = boxes.float().cpu() * scale
        return [
            concept_record(phrase, rle_to_builtins(rle), area, [x0, y0, x1 - x0, y1 - y0], score)
            for rle, area, score, (x0, y0, x1, y1) in zip(
                rles, rle_areas(rles), scores.tolist(), pixels_xyxy.tolist(), strict=True
            )
        ]
