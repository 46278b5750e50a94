"""SAM 3's point, box and mask prompts on a still image: its tracker's prompt encoder and mask
decoder (transformers' Sam3TrackerModel, as the published checkpoint holds it inside
Sam3VideoModel) over the detector's vision trunk.

The same computation as Sam3TrackerModel + Sam3TrackerProcessor on one image: the tracker's own
neck over the trunk's tokens (its three finer levels), the decoder's projections of the two finest
(`conv_s0`, `conv_s1`) and the "no memory" embedding added to the coarsest, as Sam3TrackerModel's
`get_image_embeddings` makes them; then every prompt of a request through the prompt encoder and
the mask decoder in one call, and the low-resolution logits resized bilinearly to the image and
thresholded at 0 (`post_process_masks`). The image's part is computed with the detector's, once per
image, and kept in the same embedding (`layout`): a prompt on a cached image runs no image-sized
work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sam_fast_serve.common.prompts import Prompts
from sam_fast_serve.models.amg import upsample_chunk
from sam_fast_serve.models.prompted import LOGIT_CLAMP, thresholded_masks
from sam_fast_serve.models.sam3.build import Sam3Net
from sam_fast_serve.models.upsampling import bilinear

# The neck levels the tracker reads (the fourth, at half the trunk's resolution, it never does).
LEVELS = 3
NAMES = ("tracker_0", "tracker_1", "tracker_embed")


def layout(net: Sam3Net) -> dict[str, tuple[int, ...]]:
    """The tracker's tensors of one image's embedding: the decoder's two projected fine levels and
    the image embedding (with the no-memory embedding added)."""
    assert net.video is not None
    tracker: Any = net.video.tracker_model
    decoder = tracker.mask_decoder
    side, _ = tracker.prompt_encoder.image_embedding_size
    return {
        NAMES[0]: (1, decoder.conv_s0.out_channels, side * 4, side * 4),
        NAMES[1]: (1, decoder.conv_s1.out_channels, side * 2, side * 2),
        NAMES[2]: (1, tracker.config.mask_decoder_config.hidden_size, side, side),
    }


class TrackerHead:
    """The tracker's image part and its masks for prompts. Computes in float32 unless asked."""

    def __init__(self, net: Sam3Net) -> None:
        assert net.video is not None, "a checkpoint with the tracker's weights"
        self.tracker: Any = net.video.tracker_model
        self.neck = net.video.tracker_neck
        vision: Any = net.model.config.vision_config
        self.side = vision.image_size
        self._positions: Tensor | None = None

    def image_part(self, spatial: Tensor) -> dict[str, Tensor]:
        """The tracker's tensors (`layout`) of a batch of the trunk's (B, C, h, w) tokens."""
        decoder = self.tracker.mask_decoder
        levels = [self.neck.fpn_layers[i](spatial) for i in range(LEVELS)]
        embed = levels[2] + self.tracker.no_memory_embedding.reshape(1, -1, 1, 1)
        return {NAMES[0]: decoder.conv_s0(levels[0]), NAMES[1]: decoder.conv_s1(levels[1]), NAMES[2]: embed}

    def _image_positions(self) -> Tensor:
        # The same for every image: computed once.
        if self._positions is None:
            self._positions = self.tracker.get_image_wide_positional_embeddings()
        return self._positions

    def _model_frame(self, coords: Tensor, original_size: tuple[int, int]) -> Tensor:
        """(..., 2) XY in image pixels -> the model's square (Sam3TrackerProcessor's normalization)."""
        height, width = original_size
        return coords * torch.tensor([self.side / width, self.side / height], device=coords.device)

    @torch.inference_mode()
    def predict(
        self, features: dict[str, Tensor], prompts: Prompts, original_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(P, C, H, W) boolean masks at `original_size`, their predicted IoUs (P, C) and low-res
        logits (P, C, h, w) of validated prompts on the image whose `features` these are; P =
        prompts.count, C = 3 with prompts.multimask, else 1 (chosen by stability, as the tracker's
        decoder does). Each box is one prompt; the points join every box."""
        embed = features[NAMES[2]].float()
        device = embed.device
        count = prompts.count
        points = labels = boxes = masks = None
        if prompts.points is not None and prompts.labels is not None:
            xy = torch.as_tensor(prompts.points, dtype=torch.float32, device=device)
            points = self._model_frame(xy, original_size)[None, None].expand(1, count, -1, -1)
            labels = torch.as_tensor(prompts.labels, dtype=torch.int32, device=device)[None, None].expand(1, count, -1)
        if prompts.boxes is not None:
            corners = torch.as_tensor(prompts.boxes, dtype=torch.float32, device=device).view(-1, 2, 2)
            boxes = self._model_frame(corners, original_size).view(1, count, 4)
        if prompts.mask_input is not None:
            masks = torch.as_tensor(prompts.mask_input, device=device)[None, None]
        if points is None and boxes is None:
            # A mask prompt alone: one empty point (label -1), as Sam3TrackerModel pads it.
            points = torch.zeros(1, 1, 1, 2, device=device)
            labels = -torch.ones(1, 1, 1, dtype=torch.int32, device=device)
        sparse, dense = self.tracker.prompt_encoder(
            input_points=points, input_labels=labels, input_boxes=boxes, input_masks=masks
        )
        low_res, iou, _, _ = self.tracker.mask_decoder(
            image_embeddings=embed,
            image_positional_embeddings=self._image_positions(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=prompts.multimask,
            high_resolution_features=[features[NAMES[0]].float(), features[NAMES[1]].float()],
        )
        low_res, iou = low_res[0].float(), iou[0].float()
        per_chunk = upsample_chunk(device, original_size[0] * original_size[1])
        masks = thresholded_masks(lambda chunk: bilinear(chunk, original_size), low_res, 0.0, original_size, per_chunk)
        return masks, iou, low_res.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
