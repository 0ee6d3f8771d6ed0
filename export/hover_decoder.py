"""Hover previews: the per-click graph of the fast path, cut down to the one mask a preview shows.

A hover preview draws only the multimask candidate with the highest predicted IoU
(the one a click there would preselect). ``decoder_hover.onnx`` takes the same
inputs as ``decoder_prepared.onnx`` (the prompt and the per-image tensors of
``decoder_prepare.onnx``), runs the same prompt encoding, two-way transformer and
upscaling math (``PreparedDecoderOnnx``'s own methods), then picks the best of
tokens 1..3 in the graph from the IoU predictions, and does the hypernetwork
product, the pixel shuffle and the display resampling for that token only.
Its mask is the click graph's mask of that token, to float rounding.

The upscaling (the first convolution's low-rank term, both GELUs, the second
convolution: about half of a click) also runs only where the display looks:
the image covers (h1, w1) / 4 of the 256 x 256 low-res frame and the rest is
padding, so only the image tokens (4 x 4 low-res pixels each) under the rows and
columns ``DecoderOnnx.display`` reads are upscaled: 43 of 64 token rows for a
3:2 image, 49 for 4:3. That is exact too: every pixel's value is computed by
the same operations from the same numbers; the transformer before it still
runs on all 4096 image tokens (attention reads the padding as well).

Inputs: ``PREPARED_INPUTS``. Outputs:

- ``iou_predictions`` f32 [1, 4]: as the click graph's;
- ``best_token`` int64 [1]: the multimask token (1..3) with the highest predicted
  IoU, the first on a tie (ONNX ArgMax; the page breaks ties by smaller area, so
  an exact tie could preview the other of the two);
- ``low_res_mask`` f32 [1, 1, Hl, Wl]: that token's logits over the top-left part of the
  256 x 256 frame that the display reads (``low_res_masks[:, best, :Hl, :Wl]``, Hl and Wl
  multiples of 4, whole image tokens);
- ``display_mask`` uint8 [1, 1, Hd, Wd]: its ``display_masks`` (0 or 255).

Meant for one-point prompts without a mask input (what a hover asks); for
others it still answers, always with a multimask token.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from trimask.export.onnx_decoder import resized_size
from trimask.export.prepared_decoder import PreparedDecoderOnnx, _leading, export_click_graph

HOVER_OUTPUT_SHAPES: dict[str, tuple[int | str, ...]] = {
    "iou_predictions": (1, 4),
    "best_token": (1,),
    "low_res_mask": (1, 1, "low_res_height", "low_res_width"),
    "display_mask": (1, 1, "display_height", "display_width"),
}
HOVER_OUTPUT_NAMES = tuple(HOVER_OUTPUT_SHAPES)


class HoverDecoderOnnx(PreparedDecoderOnnx):
    """``PREPARED_INPUTS`` -> (iou_predictions, best_token, low_res_mask, display_mask) of the best multimask token."""

    def forward(  # type: ignore[override]
        self,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor,
        *prepared: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """See the module docstring."""
        hs, image, state = self.attend(point_coords, point_labels, mask_input, has_mask_input, prepared)
        iou_predictions = self.mask_decoder.iou_prediction_head(hs[:, 0])  # 1 x 4
        best_token = torch.argmax(iou_predictions[0, 1:], dim=0, keepdim=True) + 1  # [1], int64
        hyper = torch.index_select(self.hypernetworks(hs), 0, best_token)  # 1 x C/8

        rows, cols = self.displayed_tokens(orig_im_size)
        side = self.prompt_encoder.image_embedding_size[0]

        def crop(t: Tensor) -> Tensor:  # N x D -> rows*cols x D, the displayed image tokens
            t = _leading(_leading(t.reshape(side, side, -1), rows, axis=0), cols, axis=1)
            return t.reshape(-1, t.shape[2])

        w1, b1 = self.upscaling_weights()
        numerator = crop(state["upscaling"]) + crop(image.z) @ image.coefficients(w1, b1)
        scale = None if image.scale is None else crop(image.scale)
        features = self.upscale(numerator, scale)  # rows*cols x 16 x C/8
        masks = (features @ hyper.T).reshape(rows[0], cols[0], 2, 2, 2, 2)  # y x a b a2 b2
        low_res_mask = masks.permute(0, 2, 4, 1, 3, 5).reshape(1, 1, 4 * rows[0], 4 * cols[0])  # y a a2, x b b2
        display_mask = (self.display(low_res_mask, orig_im_size) > self.mask_threshold).to(torch.uint8) * 255
        return iou_predictions, best_token, low_res_mask, display_mask

    def displayed_tokens(self, orig_im_size: Tensor) -> tuple[Tensor, Tensor]:
        """Rows and columns of image tokens (int64 [1] each) that cover the low-res rows and columns
        ``display`` reads: ceil(h1 / 4) + 1 of them (the last centre's neighbour), 4 per token."""
        valid = resized_size(orig_im_size, self.input_size)  # h1, w1
        ratio = self.input_size // self.low_res_size  # 4
        needed = torch.clamp(torch.div(valid + ratio - 1, ratio, rounding_mode="floor") + 1, max=self.low_res_size)
        per_token = self.low_res_size // self.prompt_encoder.image_embedding_size[0]  # 4
        tokens = torch.div(needed + per_token - 1, per_token, rounding_mode="floor")
        return tokens[0:1], tokens[1:2]


def export_hover_decoder(sam: nn.Module, path: str | Path, *, quantize: bool = False) -> Path:
    """Write decoder_hover.onnx for ``sam`` to ``path`` (atomically; quantized if asked). Returns the path."""
    return export_click_graph(
        sam,
        HoverDecoderOnnx(sam),
        path,
        HOVER_OUTPUT_SHAPES,
        {
            "low_res_mask": {2: "low_res_height", 3: "low_res_width"},
            "display_mask": {2: "display_height", 3: "display_width"},
        },
        quantize=quantize,
    )
