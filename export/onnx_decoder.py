"""SAM's prompt encoder + mask decoder as one ONNX graph for the browser.

The graph answers one click (or box, or refinement) for an image whose
embedding was computed on the server. It is a thin wrapper over the model's
own ``prompt_encoder`` and ``mask_decoder`` (``_embed_points``,
``_embed_masks``, ``predict_masks``): it adds only the mask-input switch, the
display outputs and the export itself.

Inputs (as in the official SAM ONNX export):

- ``image_embeddings`` f32 [1, 256, 64, 64]
- ``point_coords`` f32 [1, N, 2], (x, y) in the 1024-longest-side frame, N >= 1
- ``point_labels`` f32 [1, N]: 1 foreground, 0 background, 2 / 3 top-left /
  bottom-right box corner, -1 padding point (add one ``(0, 0), -1`` when
  there is no box, as SAM does)
- ``mask_input`` f32 [1, 1, 256, 256]: a previous ``low_res_masks`` token
- ``has_mask_input`` f32 [1]: 1 to use ``mask_input``, 0 to ignore it
- ``orig_im_size`` f32 [2]: (H, W) of the original image

Outputs:

- ``iou_predictions`` f32 [1, 4]: predicted IoU per mask token
- ``low_res_masks`` f32 [1, 4, 256, 256]: logits of all four mask tokens
  (token 0 the single-mask output, tokens 1..3 the multimask candidates), in
  the padded 256 x 256 frame, exactly the PyTorch decoder's output. The
  browser turns the accepted token into a full-resolution mask with SAM's
  postprocessing, and feeds a token back as ``mask_input``.
- ``display_masks`` uint8 [1, 4, Hd, Wd], 0 or 255: each token's mask for
  drawing, with Hd, Wd = floor(H * s + 0.5), floor(W * s + 0.5) (at least 1),
  s = 512 / max(H, W): 341 x 512 for 1024 x 1536, 384 x 512 for 3000 x 4000.
  Pixel (i, j) is the logit surface (SAM's bilinear upsampling of the
  256 x 256 logits) sampled at the centre of the image region
  [i H / Hd, (i+1) H / Hd) x [j W / Wd, (j+1) W / Wd), thresholded at > 0;
  so the display mask covers exactly the image (no padding, no crop error)
  and is stretched over the whole image when drawn.
- ``areas`` f32 [1, 4]: the fraction of the image each token's display mask
  covers (mean of ``display_masks > 0``), to sort candidates into
  subpart < part < whole without reading the masks.

Why the display outputs are shaped so: the official export returns four
float masks at full image resolution (4 x H x W x 4 bytes: 25 MB at
1024 x 1536, 192 MB at 3000 x 4000) whose upsampling and copying grow with
the image (measured: about a fifth of a click's CPU time at 1024 x 1536,
more than half at 3000 x 4000). The browser draws candidates on a screen-sized canvas,
so it needs coverage, not full resolution: 512 on the long side is about the
size the image is shown at, the thresholded bilinear surface at that size
has smooth contours (at 256 the staircase of the 4-pixel blocks shows when
stretched), the cost is fixed whatever the image size, and four uint8 masks
are at most 4 x 512 x 512 bytes = 1 MB. The display grid is sampled
straight from the 256 frame (one half-pixel bilinear ``Resize`` by a scale
computed from ``orig_im_size``), never materialising the 1024 x 1024
intermediate of SAM's postprocessing; it is the same bilinear surface SAM
thresholds, so display and accepted masks agree up to a display pixel.
The display outputs cost about 4% of a click (2.5 ms of 60 ms CPU).

Speed (bench/decoder.py, 200 clicks, CPU time on one thread, which other
load on the shared machine does not change): 61 ms per click against 84 ms
for the official style at 1024 x 1536 (0.73x) and 58 ms against 145 ms at
3000 x 4000 (0.40x); the cost does not depend on the image size. What is left
is the decoder itself. After export, the two ``Tile`` nodes of
``predict_masks``' per-prompt repeat (always 1 here) become ``Identity``
(about 6% of a click). The optional two-graph fast path in
``prepared_decoder.py`` moves the first layer's image-side projections to a
once-per-image graph: 0.66x.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

OPSET = 17
# Long side of display_masks, in pixels (see the module docstring).
DISPLAY_LONG_SIDE = 512

INPUT_NAMES = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
OUTPUT_NAMES = ("iou_predictions", "low_res_masks", "display_masks", "areas")


def resized_size(orig_im_size: torch.Tensor, long_side: float) -> torch.Tensor:
    """(H, W) f32 [2] -> the size with the longest side ``long_side``, int64 [2].

    Same rounding as SAM's ``ResizeLongestSide`` (floor(x + 0.5)), at least 1.
    """
    size = orig_im_size.to(torch.float32)
    scale = long_side / torch.max(size)
    # At least 1: a sliver image (aspect beyond 1:2048) still has one row.
    return torch.clamp(torch.floor(size * scale + 0.5), min=1).to(torch.int64)


class _ResizeLinearByScales(torch.autograd.Function):
    """Half-pixel bilinear resize by given (non-integer) scales, exported as ONNX ``Resize``.

    ``F.interpolate`` exports only constant scales or a target size (which
    recomputes the scale from the rounded size and shifts the samples); the
    display grid needs the exact scale, computed in the graph from
    ``orig_im_size``. Both use the given scale for the coordinate mapping,
    x_in = (x_out + 0.5) / scale - 0.5 clamped to the input, and output size
    floor(size * scale).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # noqa: D102
        factors = (float(scales[2]), float(scales[3]))
        return F.interpolate(
            x, scale_factor=factors, mode="bilinear", align_corners=False, recompute_scale_factor=False
        )

    @staticmethod
    def symbolic(g, x, scales):  # noqa: D102
        roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        return g.op(
            "Resize", x, roi, scales, mode_s="linear", coordinate_transformation_mode_s="half_pixel"
        )


class DecoderOnnx(nn.Module):
    """One click of SAM: prompts + image embedding -> 4 masks, scores, display masks.

    Args:
        sam: a model with ``prompt_encoder`` and ``mask_decoder`` (SAM's modules;
            their parameters are shared, not copied) and ``mask_threshold``.
        display_long_side: long side of ``display_masks`` in pixels.
    """

    def __init__(self, sam: nn.Module, *, display_long_side: int = DISPLAY_LONG_SIDE) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.mask_threshold = float(getattr(sam, "mask_threshold", 0.0))
        self.input_size = int(self.prompt_encoder.input_image_size[0])
        self.low_res_size = int(self.prompt_encoder.mask_input_size[0])
        self.display_long_side = int(display_long_side)

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """1 x 1 x 256 x 256 logits, [1] flag -> 1 x C x 64 x 64 dense embedding.

        A blend instead of a branch so one graph serves both cases.
        """
        pe = self.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * pe._embed_masks(mask_input) + (1 - has_mask_input) * no_mask

    def display(self, low_res_masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """1 x T x 256 x 256 logits -> 1 x T x Hd x Wd logits sampled at display pixel centres.

        The image covers (h1, w1) / 4 of the 256 frame, (h1, w1) its size resized
        to 1024 on the long side. Display row i's centre, (i + 0.5) / Hd of the
        image height, lies at (i + 0.5) * h1 / (4 Hd) in the 256 frame: that is a
        half-pixel bilinear resize by the scale 4 Hd / h1, cropped to Hd rows.
        The input is cropped first to the rows/columns that resize reads.
        """
        valid = resized_size(orig_im_size, self.input_size)  # h1, w1
        size_d = resized_size(orig_im_size, self.display_long_side)  # Hd, Wd
        ratio = self.input_size // self.low_res_size  # 4
        # Rows the interpolation can touch: up to ceil(h1 / 4) (the neighbour of the last centre).
        needed = torch.clamp(torch.div(valid + ratio - 1, ratio, rounding_mode="floor") + 1, max=self.low_res_size)
        cropped = low_res_masks[:, :, : needed[0], : needed[1]]
        scale = ratio * size_d.to(torch.float32) / valid.to(torch.float32)
        scales = torch.cat([torch.ones(2), scale])
        resized = _ResizeLinearByScales.apply(cropped, scales)
        return resized[:, :, : size_d[0], : size_d[1]]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """See the module docstring for shapes; returns
        (iou_predictions, low_res_masks, display_masks, areas)."""
        dense = self.embed_mask(mask_input, has_mask_input)
        iou_predictions, low_res_masks = self.decode(image_embeddings, point_coords, point_labels, dense)
        return self.with_display(iou_predictions, low_res_masks, orig_im_size)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's prompt encoding + ``predict_masks`` -> (iou 1 x 4, logits 1 x 4 x 256 x 256).

        dense: 1 x C x 64 x 64 (or broadcastable) dense prompt embedding.
        """
        # Padding and box corners come in as labelled points, so no padding is added here.
        sparse = self.prompt_encoder._embed_points(point_coords, point_labels, pad=False)
        low_res_masks, iou_predictions = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return iou_predictions, low_res_masks

    def with_display(
        self, iou_predictions: torch.Tensor, low_res_masks: torch.Tensor, orig_im_size: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder outputs -> (iou_predictions, low_res_masks, display_masks, areas)."""
        inside = self.display(low_res_masks, orig_im_size) > self.mask_threshold
        display_masks = inside.to(torch.uint8) * 255
        areas = inside.to(torch.float32).mean(dim=(2, 3))
        return iou_predictions, low_res_masks, display_masks, areas


def example_inputs(num_points: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes for tracing (values are arbitrary)."""
    return (
        torch.randn(1, 256, 64, 64),
        torch.randint(0, 1024, (1, num_points, 2)).to(torch.float32),
        torch.tensor([[1.0] * (num_points - 1) + [-1.0]]),
        torch.randn(1, 1, 256, 256),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )


# Output shapes as the browser sees them; tracing leaves them symbolic.
OUTPUT_SHAPES: dict[str, tuple[int | str, ...]] = {
    "iou_predictions": (1, 4),
    "low_res_masks": (1, 4, 256, 256),
    "display_masks": (1, 4, "display_height", "display_width"),
    "areas": (1, 4),
}


def _fix_output_shapes(path: Path, shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Write the known output shapes into the graph (static where they are fixed)."""
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[output.name]):
            dim.Clear()
            if isinstance(value, int):
                dim.dim_value = value
            else:
                dim.dim_param = value
    onnx.save(model, str(path))


def trace_to_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_shapes: dict[str, tuple[int | str, ...]],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """torch.onnx.export (TorchScript tracer, opset 17) + the declared output shapes."""
    # The tracer warns about Python scalars (e.g. sqrt of the head size) that are
    # constants of the architecture anyway; keep the CLI output clean.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=input_names,
            output_names=list(output_shapes),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _fix_output_shapes(path, output_shapes)


def drop_unit_tiles(path: Path, probe_feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Replace each ``Tile`` whose repeats are all 1 for every probe input by ``Identity``.

    ``predict_masks`` repeats the image embedding and its positional encoding
    once per prompt set (``repeat_interleave``); the batch is always 1 here,
    but the tracer computes the repeat count from shapes at run time, so every
    click would copy two 4 MB tensors, and the constant positional encoding
    could not be folded. The repeats are evaluated for the probe inputs
    (several point counts and image sizes); only Tiles that never repeat go.
    Returns the names of the replaced nodes.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(path))
    tiles = [node for node in model.graph.node if node.op_type == "Tile"]
    if not tiles:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in tiles:
        probe.graph.output.append(helper.make_tensor_value_info(node.input[1], onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    unit = dict.fromkeys((node.name for node in tiles), True)
    for feeds in probe_feeds:
        for node, repeats in zip(tiles, session.run([node.input[1] for node in tiles], feeds)):
            unit[node.name] = unit[node.name] and bool(np.all(repeats == 1))
    for node in tiles:
        if unit[node.name]:
            node.CopyFrom(helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name))
    onnx.save(model, str(path))
    return [name for name, is_unit in unit.items() if is_unit]


def probe_inputs() -> list[tuple[torch.Tensor, ...]]:
    """Inputs (in INPUT_NAMES order) with 1, 2 and 5 points and three image sizes."""
    probes = []
    for num_points, size in ((1, (480.0, 640.0)), (2, (3000.0, 4000.0)), (5, (1536.0, 1024.0))):
        args = list(example_inputs(num_points))
        args[5] = torch.tensor(size)
        probes.append(tuple(args))
    return probes


POINT_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
DISPLAY_AXES = {"display_masks": {2: "display_height", 3: "display_width"}}


def _export_fp32(sam: nn.Module, path: Path) -> None:
    trace_to_onnx(
        DecoderOnnx(sam), example_inputs(), path, list(INPUT_NAMES), OUTPUT_SHAPES, POINT_AXES | DISPLAY_AXES
    )
    drop_unit_tiles(path, [
        {name: value.numpy() for name, value in zip(INPUT_NAMES, args)} for args in probe_inputs()
    ])


# A weight matrix stays fp32 when one of its columns (one output channel) loses more than this
# fraction of its norm in the matrix's uint8 copy (one scale per tensor). SAM's trained weights lose
# about 1 %; a few large entries beside small ones (the coordinate frequencies of the positional
# encoding; the tiny model's laid-out decoder) lose the small ones entirely.
QUANTIZE_MAX_ERROR = 0.03
LAID_OUT_VALUES = 8  # a weight matrix of at most this many distinct values is laid out by hand (_laid_out)


def uint8_column_error(weight: np.ndarray) -> float:
    """The largest relative error of a column of ``weight`` (``in x out``) after per-tensor asymmetric
    uint8 quantization, as onnxruntime's dynamic quantization stores it (the range includes 0)."""
    lo, hi = min(0.0, float(weight.min())), max(0.0, float(weight.max()))
    scale = (hi - lo) / 255 or 1.0
    zero = round(-lo / scale)
    restored = (np.clip(np.round(weight / scale) + zero, 0, 255) - zero) * scale
    norms = np.linalg.norm(weight, axis=0)
    used = norms > 0
    if not used.any():
        return 0.0
    return float((np.linalg.norm(weight - restored, axis=0)[used] / norms[used]).max())


def poorly_quantized_nodes(model_path: Path, max_error: float = QUANTIZE_MAX_ERROR) -> list[str]:
    """Names of the MatMul / Gemm nodes whose 2-D weight has ``uint8_column_error`` above ``max_error`` or is
    laid out by hand (``_laid_out``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    weights = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        found = [weights[name] for name in node.input if name in weights and len(weights[name].dims) == 2]
        if not found:
            continue
        weight = numpy_helper.to_array(found[0])
        if uint8_column_error(weight) > max_error or _laid_out(weight):
            names.append(node.name)
    return names


def _laid_out(weight: np.ndarray) -> bool:
    """Whether ``weight`` is a hand-laid selection of channels (a few distinct values, such as 0 and +-1), as
    the tiny model's laid-out decoder has. Such a matrix routes single channels of
    its input, and dynamic quantization would put that input through one uint8 scale per call, set by its
    largest channel: the final token->image attention's value projection of ``tiny`` alone took the quantized
    graph's agreement with fp32 to a mean mask IoU of 0.45. Trained weights are never like this."""
    return bool(np.abs(weight).max() > 0 and len(np.unique(weight)) <= LAID_OUT_VALUES)


def quantize_file(src: Path, dst: Path) -> None:
    """Dynamic uint8 weight quantization (weights uint8, activations quantized per call); the weights
    that one uint8 scale cannot hold (``poorly_quantized_nodes``) stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = poorly_quantized_nodes(src)
    # quantize_dynamic logs a root-level hint to run its shape pre-processing; it
    # only helps static quantization, and the hint would reach the CLI user.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            model_input=str(src),
            model_output=str(dst),
            per_channel=False,
            reduce_range=False,
            weight_type=QuantType.QUInt8,
            nodes_to_exclude=keep,
        )
    finally:
        root.setLevel(level)


def export_decoder(sam: nn.Module, out_path: str | Path, *, quantize: bool = False) -> Path:
    """Export ``sam``'s prompt encoder + mask decoder to ``out_path`` (ONNX, opset 17).

    Written to a temporary file next to ``out_path`` and moved into place, so a
    reader never sees a partial file. Returns ``out_path``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "decoder.onnx"
        _export_fp32(sam, fp32)
        _finish(fp32, out_path, quantize)
    return out_path


def _finish(fp32: Path, out_path: Path, quantize: bool) -> None:
    """Check the traced file, quantize it if asked, and move the result to out_path."""
    import onnx

    onnx.checker.check_model(str(fp32), full_check=True)
    final = fp32
    if quantize:
        final = fp32.with_name(fp32.stem + ".quant.onnx")
        quantize_file(fp32, final)
        onnx.checker.check_model(str(final))
    os.replace(final, out_path)
