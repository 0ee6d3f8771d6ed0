"""The SAM model: an image encoder, a prompt encoder and a mask decoder, with SAM's pixel statistics.

State-dict keys are those of the official checkpoints (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``; ``pixel_mean``/``pixel_std`` are non-persistent buffers, as officially).
The stateful "set image once, prompt many times" layer lives elsewhere (embedder, ONNX decoder).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trimask.models.mask_decoder import MaskDecoder
from trimask.models.prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
        image_size: int = 1024,
    ) -> None:
        """image_encoder maps B x 3 x image_size x image_size (normalized, padded) to B x 256 x 64 x 64."""
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: Tensor) -> Tensor:
        """x: (B x) 3 x h x w float pixels 0..255, longest side already resized ->
        normalized, zero-padded bottom-right to image_size x image_size."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
        """masks: B x C x 256 x 256 logits -> B x C x H x W logits at original_size (H, W).

        input_size is the (h, w) of the resized image inside the padded input; the padding is cropped off.
        """
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """images: B x 3 x 1024 x 1024 (normalized, padded) -> embeddings B x 256 x 64 x 64."""
        return self.image_encoder(images)

    @torch.no_grad()
    def decode(
        self,
        image_embeddings: Tensor,
        *,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """All four tokens for one image's prompt sets.

        image_embeddings: 1 x 256 x 64 x 64; point_coords: B x N x 2 and point_labels: B x N
        (1024 frame); boxes: B x 4; mask_input: B x 1 x 256 x 256.
        Returns low-res logits B x 4 x 256 x 256 (token 0 single, 1..3 multimask) and IoU B x 4.
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, Tensor]]:
        """The official end-to-end call: each record has 'image' (3 x h x w, resized, 0..255),
        'original_size' (H, W) and optional 'point_coords', 'point_labels', 'boxes', 'mask_inputs'.
        Returns per image: 'masks' (bool B x C x H x W), 'iou_predictions' (B x C), 'low_res_logits'."""
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs
