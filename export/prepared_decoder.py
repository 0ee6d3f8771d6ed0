"""Optional faster clicks: prompt-independent decoder work done once per image.

In the first layer of SAM's two-way transformer three projections read only
the image side (the image embedding plus the no-mask embedding and the
positional encoding), so for a given image they are the same on every click:

- ``token_to_image_keys``   = layer0.cross_attn_token_to_image.k_proj(keys + pe)
- ``token_to_image_values`` = layer0.cross_attn_token_to_image.v_proj(keys)
- ``image_to_token_queries`` = layer0.cross_attn_image_to_token.q_proj(keys + pe)

each f32 [1, 4096, 128] (keys = image embedding + no-mask embedding, flattened).

``decoder_prepare.onnx``: ``image_embeddings`` -> those three tensors; run once
per image (about 5 ms on the 2-core CPU).

``decoder_prepared.onnx``: the inputs of ``decoder.onnx`` without
``mask_input`` / ``has_mask_input`` (a previous mask changes the keys, so
refinement with a mask goes through ``decoder.onnx``), plus the three tensors;
outputs exactly as ``decoder.onnx`` (same names, shapes and meaning).

The graph is still the model's own code: while tracing, the three projection
layers are swapped for modules that return the given tensors, so nothing is
re-implemented. ``decoder.onnx`` alone remains the complete contract.

Does it pay? Measured with ``bench/decoder.py`` (CPU time, one thread, 200
clicks, 1024 x 1536): 55.6 ms per click instead of 61.2 ms (-9%; 0.66x the
official style instead of 0.73x), for 5 ms once per image, 6 MB of state per
image and a 0.4 MB extra file. It is what brings a click under the 0.7x
target, so the server offers it and the browser uses it when it can; a click
with a mask input still runs ``decoder.onnx``.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from trimask.export.onnx_decoder import (
    DISPLAY_AXES,
    INPUT_NAMES,
    OUTPUT_SHAPES,
    POINT_AXES,
    DecoderOnnx,
    _finish,
    drop_unit_tiles,
    example_inputs,
    probe_inputs,
    trace_to_onnx,
)

PREPARED_NAMES = ("token_to_image_keys", "token_to_image_values", "image_to_token_queries")
PREPARED_INPUTS = ("image_embeddings", "point_coords", "point_labels", "orig_im_size") + PREPARED_NAMES


def _first_layer_projections(sam: nn.Module) -> tuple[nn.Module, nn.Module]:
    layer = sam.mask_decoder.transformer.layers[0]
    return layer.cross_attn_token_to_image, layer.cross_attn_image_to_token


class _Given(nn.Module):
    """Stands in for a projection layer: returns a tensor computed elsewhere."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.value


@contextmanager
def _projections_given(sam: nn.Module, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> Iterator[None]:
    token_to_image, image_to_token = _first_layer_projections(sam)
    saved = (token_to_image.k_proj, token_to_image.v_proj, image_to_token.q_proj)
    token_to_image.k_proj, token_to_image.v_proj = _Given(keys), _Given(values)
    image_to_token.q_proj = _Given(queries)
    try:
        yield
    finally:
        token_to_image.k_proj, token_to_image.v_proj, image_to_token.q_proj = saved


class PrepareOnnx(nn.Module):
    """image_embeddings 1 x 256 x 64 x 64 -> the three first-layer projections, each 1 x 4096 x 128."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.token_to_image, self.image_to_token = _first_layer_projections(sam)

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See the module docstring."""
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = (image_embeddings + no_mask).flatten(2).permute(0, 2, 1)
        pe = self.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
        return (
            self.token_to_image.k_proj(keys + pe),
            self.token_to_image.v_proj(keys),
            self.image_to_token.q_proj(keys + pe),
        )


class PreparedDecoderOnnx(DecoderOnnx):
    """decoder.onnx without mask input, reading the first-layer projections from inputs."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__(sam)
        self.sam = sam

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        orig_im_size: torch.Tensor,
        token_to_image_keys: torch.Tensor,
        token_to_image_values: torch.Tensor,
        image_to_token_queries: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(iou_predictions, low_res_masks, display_masks, areas) as DecoderOnnx, no mask input."""
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        with _projections_given(self.sam, token_to_image_keys, token_to_image_values, image_to_token_queries):
            iou_predictions, low_res_masks = self.decode(image_embeddings, point_coords, point_labels, no_mask)
        return self.with_display(iou_predictions, low_res_masks, orig_im_size)


def export_prepared_decoder(
    sam: nn.Module, prepare_path: str | Path, decoder_path: str | Path, *, quantize: bool = False
) -> tuple[Path, Path]:
    """Write decoder_prepare.onnx (always fp32: it is small) and decoder_prepared.onnx
    (quantized if asked); each appears atomically. Returns both paths."""
    prepare_path, decoder_path = Path(prepare_path), Path(decoder_path)
    base = example_inputs()
    embedding, coords, labels, orig_size = base[0], base[1], base[2], base[5]
    with torch.no_grad():
        prepared = PrepareOnnx(sam)(embedding)
    shapes = {name: (1, 4096, 128) for name in PREPARED_NAMES}
    for path in (prepare_path, decoder_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prepare_path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "decoder_prepare.onnx"
        trace_to_onnx(PrepareOnnx(sam), (embedding,), traced, ["image_embeddings"], shapes, {})
        _finish(traced, prepare_path, quantize=False)
    with tempfile.TemporaryDirectory(dir=decoder_path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "decoder_prepared.onnx"
        trace_to_onnx(
            PreparedDecoderOnnx(sam),
            (embedding, coords, labels, orig_size, *prepared),
            traced,
            list(PREPARED_INPUTS),
            OUTPUT_SHAPES,
            POINT_AXES | DISPLAY_AXES,
        )
        probes = []
        for args in probe_inputs():
            named = dict(zip(INPUT_NAMES, args)) | dict(zip(PREPARED_NAMES, prepared))
            probes.append({name: named[name].numpy() for name in PREPARED_INPUTS})
        drop_unit_tiles(traced, probes)
        _finish(traced, decoder_path, quantize)
    return prepare_path, decoder_path
