"""Faster clicks: the mask decoder split exactly into a once-per-image graph and a cheap per-click graph.

``decoder.onnx`` spends almost all of a click on dense maps of the 4096 image
tokens (4096 x 256): nine 256 -> 128 projections, two 128 -> 256 output
projections and the first transposed convolution (a 256 -> 256 map per token),
about 1.6 of its 1.7 G multiply-adds. Here each such map is rewritten, with
exact algebra, as (a part that depends on the image only, computed once per
image) + (a low-rank part that depends on the prompt, computed per click).

Why it is exact. Let e_i be image token i (the embedding, 256-d) and s_i =
e_i + dense prompt embedding. Everything the transformer adds to an image token
is low rank or a per-token affine map:

- the dense prompt: s_i = e_i + h_i Wm^T + c, with h_i the 16 channels of the
  mask downscaler before its last 1x1 convolution (times ``has_mask_input``)
  and c the blend of the no-mask embedding and that convolution's bias;
- image->token attention: out_i = sum_{head, token} p_i,(h,t) (Wo_h v_t,h) + bo
  = P_i @ U + const, with P (4096 x heads*(tokens-1)) the attention weights and
  U the tokens' values mapped by their head's slice of the output projection
  (a head's weights sum to 1, so its last token goes into const: 48 rows for
  one click);
- LayerNorm: LN(y)_i = g * (y_i - mu_i) / sigma_i + b.

So at every stage the image tokens are (``FactoredImage``)

    X_i = (gain * e_i + z_i @ r) / scale_i,

gain a constant vector (the product of the LayerNorm gains so far), z
(4096 x rank, column 0 = scale, so r's row 0 is the constant term) and scale
(4096 x 1) per click, r (rank x 256) per click and small. A linear map W is then

    W X_i = ((W diag(gain)) e_i + z_i @ (r W^T)) / scale_i,

and (W diag(gain)) e is what ``decoder_prepare.onnx`` computes once per image.
Adding P @ U appends columns scale * P to z; a LayerNorm appends scale and
scale * mu and multiplies scale by sigma. The statistics mu_i, sigma_i need the
tokens themselves, so the click graph also materializes y = X + P @ U + bo at
each layer (one 4096 x rank x 256 product). The token->image attentions never
project the image: their logits are q . k_i = (q . A_i + z_i (Rk q)) / scale_i
(+ q . pe term) and their outputs (p / scale) @ B + ((p / scale) @ z) @ Rv,
products with heads*tokens columns instead of 128. The transposed convolution
(kernel 2, stride 2, no overlap) is a per-token 256 -> 2x2x64 map, so it is
factored the same way; its LayerNorm2d, GELU, the second transposed
convolution and the hypernetwork product run per click in token-major layout
(4096 x 2x2 x 2x2 x 32), the only pixel shuffle being that of the final logits.
The one departure from plain algebra: attention weights are kept >= 1e-15 and
mask features under 1e-15 are set to 0, because tiny factors (subnormal, or
whose products underflow) make the low-rank products several times slower on
x86, in WebAssembly most (seen with the trained tiny model); a weight of 1e-15
cannot show in a float32 result here (see ``_NEGLIGIBLE``).

Per image, ``decoder_prepare.onnx``: ``image_embeddings`` -> ``PREPARED_NAMES``:
``image_tokens`` (e, 4096 x 256); per two-way layer l ``layer{l}_keys`` /
``_values`` (token->image, per head: 8 x 4096 x 16) and ``layer{l}_queries``
(image->token, 4096 x 128); ``final_keys`` / ``final_values`` (8 x 4096 x 16);
``upscaling`` (4096 x 256). Layer 0's keys and queries include the positional
encoding (its tokens are not normalized: scale 1); later layers add the
positional term from constants of the click graph. 25.2 MB of fp32 per image,
one 4096 x 256 x 1280 product: about one old click's work.

Per click, ``decoder_prepared.onnx``: ``decoder.onnx``'s inputs without
``image_embeddings`` (mask input included, so refinement clicks take this path
too) plus those tensors -> exactly ``decoder.onnx``'s outputs (same names,
shapes, meaning; the display outputs are ``DecoderOnnx.with_display``'s).
Left per click for one point (7 tokens): about 0.55 G multiply-adds instead of
1.74 G, the largest pieces the upscaling's low-rank term (4096 x 101 x 256;
117 with a mask input: without one its 16 channels drop out of every low-rank
product, see ``embed_image``), the second transposed convolution (134 M, which
a GELU separates from anything per image) and the two materialized layers, plus
elementwise work on 4096 x 256 and 16384 x 64. The image tokens' LayerNorms are
plain ops on statistics the factored form needs anyway (``_centre_and_spread``;
onnxruntime-web's LayerNormalization kernel is twice as slow), and the
upscaling's LayerNorm2d needs no mean (``_centred_upscaling``). The low-rank
form loses its edge once heads*(tokens-1) passes 128 (more than 12 points):
still exact, no longer cheaper.

The weights are read from the model's own modules at export time; the token
side calls those modules (self-attention, MLPs, norms, heads) unchanged.

Hover previews run ``decoder_hover.onnx`` (``trimask.export.hover_decoder``): this
per-click graph cut to the one mask a preview shows, from the same methods.

Measured (vit_b weights, 200 clicks at 1024 x 1536, CPU time on one thread,
``bench/decoder.py``, final graph): 37 ms per click against 59 ms for
``decoder.onnx`` and 81 ms for the official export style (0.46x);
``decoder_prepare.onnx`` 44 ms once per image. In onnxruntime-web (``bench/browser.py``, Chromium, WASM, one
thread, tiny model) a click decodes in 107 ms against 184 ms; with the changes
above (Node's WASM, one thread, same run) 88 ms against 105 ms. Where those 88 ms
go (time to cut points of the graph): each two-way layer about 20, the final
attention and the upscaling's low-rank term 9, the first LayerNorm2d and GELU 7,
the second transposed convolution 12 and its GELU 9, the hypernetwork product
and display outputs 11; about 4 of it is onnxruntime-web copying the 25 MB of
per-image tensors into the WASM heap, which it does on every run. The quantized
click graph is no faster (its remaining weight products are small) but 7.7 MB
instead of 22.7 MB (which includes 6 MB of positional-term constants).
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

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


def prepared_names(depth: int) -> tuple[str, ...]:
    """Names of the per-image tensors for a transformer of ``depth`` two-way layers."""
    per_layer = [f"layer{l}_{kind}" for l in range(depth) for kind in ("keys", "values", "queries")]
    return ("image_tokens", *per_layer, "final_keys", "final_values", "upscaling")


# SAM's decoder always has two layers.
PREPARED_NAMES = prepared_names(2)
# The per-click graph reads the image only through the per-image tensors.
PREPARED_INPUTS = INPUT_NAMES[1:] + PREPARED_NAMES


def _flat_tokens(image: Tensor) -> Tensor:
    """1 x C x H x W -> HW x C (token-major, as the transformer flattens it)."""
    return image.flatten(2).squeeze(0).transpose(0, 1)


def _transposed_conv_as_linear(conv: nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A kernel-2 stride-2 ConvTranspose2d (Cin -> Cout) as a per-token linear map.

    Returns weight (4 Cout x Cin) and bias (4 Cout), output index (a, b, o) for
    output pixel (2y + a, 2x + b), channel o.
    """
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0):
        raise ValueError("only kernel 2, stride 2, no padding transposed convolutions are per-token maps")
    weight = conv.weight.detach()  # Cin x Cout x 2 x 2
    cin, cout = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(4 * cout, cin), conv.bias.detach().repeat(4)


def _centred_upscaling(conv: nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """The first upscaling convolution as a per-token map (``_transposed_conv_as_linear``) with each
    output pixel's channels centred, so its output has mean 0 over a pixel's channels.

    That mean is what the LayerNorm2d after it subtracts, and centring is linear: the same
    LayerNorm then needs neither the mean nor the subtraction (exact algebra).
    """
    weight, bias = _transposed_conv_as_linear(conv)
    weight = weight.reshape(4, conv.out_channels, -1)
    bias = bias.reshape(4, conv.out_channels)
    weight = weight - weight.mean(dim=1, keepdim=True)
    bias = bias - bias.mean(dim=1, keepdim=True)
    return weight.reshape(4 * conv.out_channels, -1), bias.reshape(-1)


@dataclass
class FactoredImage:
    """Image tokens X (N x C) held as X_i = (gain * e_i + z_i @ r) / scale_i.

    z: N x rank with column 0 equal to scale (so r's row 0 is X's constant
    term); r: rank x C; scale: N x 1, or None while it is 1. gain is implied:
    the per-image tensors were computed with it. For the LayerNorm statistics X
    is also kept explicitly, as ``base + sum(pending p @ u)``, the pending
    low-rank terms being added in one product when the statistics are needed.
    """

    z: Tensor
    r: Tensor
    scale: Tensor | None
    base: Tensor
    pending: tuple[tuple[Tensor, Tensor], ...]

    def coefficients(self, weight: Tensor, bias: Tensor) -> Tensor:
        """rank x D: X @ weight^T + bias = ((gain * e) @ weight^T + z @ coefficients) / scale."""
        rw = self.r @ weight.T
        return torch.cat([rw[:1] + bias, rw[1:]], dim=0)  # z's column 0 is the scale: the bias joins row 0

    def numerator(self, weight: Tensor, bias: Tensor, per_image: Tensor) -> Tensor:
        """(X @ weight^T + bias) * scale -> N x D, from per_image = (gain * e) @ weight^T (N x D)."""
        return per_image + self.z @ self.coefficients(weight, bias)

    def project(self, weight: Tensor, bias: Tensor, per_image: Tensor, offset: Tensor | None = None) -> Tensor:
        """X @ weight^T + bias (+ offset) -> N x D, from per_image = (gain * e) @ weight^T (N x D).

        offset: N x D, e.g. the positional encoding's projection (added outside the scale).
        """
        out = self.numerator(weight, bias, per_image)
        if self.scale is not None:
            out = out / self.scale
        return out if offset is None else out + offset

    def add(self, p: Tensor, u: Tensor, const: Tensor) -> FactoredImage:
        """X + p @ u + const, p: N x k, u: k x C, const: C."""
        scaled = p if self.scale is None else self.scale * p
        return FactoredImage(
            z=torch.cat([self.z, scaled], dim=1),
            r=torch.cat([self.r[:1] + const, self.r[1:], u], dim=0),
            scale=self.scale,
            base=self.base,
            pending=(*self.pending, (p, u), (torch.ones_like(p[:, :1]), const[None])),
        )

    def dense(self) -> Tensor:
        """X itself, N x C."""
        return self.base + torch.cat([p for p, _ in self.pending], 1) @ torch.cat([u for _, u in self.pending], 0)

    def layer_norm(self, norm: nn.LayerNorm) -> FactoredImage:
        """LN(X) = g * (X_i - mu_i) / sigma_i + b; the new gain is gain * g (the caller's per-image tensors).

        With scale' = scale * sigma: LN(X)_i = (gain g e_i + z_i (r g) - scale_i mu_i g + scale'_i b) / scale'_i,
        so z becomes [scale', z, scale * mu] and r becomes [b; r g; -g].
        """
        g, b = norm.weight, norm.bias
        y = self.dense()
        centred, mu, sigma = _centre_and_spread(y, norm.eps)
        scale = sigma if self.scale is None else self.scale * sigma
        return FactoredImage(
            z=torch.cat([scale, self.z, self.z[:, :1] * mu], dim=1),
            r=torch.cat([b[None], self.r * g, -g[None]], dim=0),
            scale=scale,
            # LN(y) from the statistics at hand, for the next layer; its bias joins the next dense product.
            base=centred / sigma * g,
            pending=((torch.ones_like(sigma), b[None]),),
        )


# Tiny attention weights (exp of very negative logits) and GELU tails make the low-rank products
# several times slower on x86, native or WebAssembly (20x for one product in onnxruntime-web):
# subnormal inputs, and products of two tiny factors that underflow (WASM SIMD multiplies and
# adds separately). So attention weights are raised to 1e-15 and mask features under 1e-15 set
# to 0. Exact to float32: the weights of one softmax (4096 at most) then sum to 1 + 4e-12 at most,
# far under float32's rounding (6e-8), and a feature of 1e-15 is as far under the others'.
_NEGLIGIBLE = 1e-15


def _centre_and_spread(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm's statistics over the last axis: (x - mu, mu, sigma = sqrt(var + eps)), mu and sigma ... x 1.

    Written out rather than as ONNX LayerNormalization, whose kernel onnxruntime-web 1.30 runs at
    about half the speed of these plain ops (measured on 4096 x 256 and 16384 x 64); the square is
    a product, not Pow, so onnxruntime's optimizer does not fuse the ops back into it.
    """
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    sigma = torch.sqrt((centred * centred).mean(dim=-1, keepdim=True) + eps)
    return centred, mu, sigma


def _flush_tiny(x: Tensor) -> Tensor:
    """x with entries of magnitude under _NEGLIGIBLE set to 0."""
    return torch.where(x.abs() < _NEGLIGIBLE, torch.zeros_like(x), x)


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the last axis, no weight under _NEGLIGIBLE."""
    return torch.softmax(logits, dim=-1).clamp(min=_NEGLIGIBLE)


class _Leading(torch.autograd.Function):
    """The first n entries of x along an axis, n a run-time int64 [1]: ONNX ``Slice`` with a computed end.

    (Python slicing with a tensor bound would be traced as a constant.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, n: Tensor, axis: int) -> Tensor:  # noqa: D102
        return x.narrow(axis, 0, int(n.reshape(-1)[0]))

    @staticmethod
    def symbolic(g, x, n, axis):  # noqa: D102
        starts = g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64))
        axes = g.op("Constant", value_t=torch.tensor([axis], dtype=torch.int64))
        return g.op("Slice", x, starts, n, axes)


def _leading(x: Tensor, n: Tensor, axis: int) -> Tensor:
    """x's first n[0] entries along axis (n: int64 [1], computed in the graph)."""
    return _Leading.apply(x, n, axis)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """N x D -> heads x N x D/heads."""
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)


def _token_to_image(
    attn: nn.Module, q_in: Tensor, image: FactoredImage, keys: Tensor, values: Tensor, keys_offset: Tensor | None
) -> Tensor:
    """Tokens attend to the image tokens X, in the factored form: X is never projected.

    q_in: 1 x T x C; keys, values: heads x N x d, the per-image parts of k_proj(X)
    and v_proj(X); keys_offset: heads x N x d (the positional term) or None.
    Returns attn(q_in, X (+ pe), X): 1 x T x C.

    k_i = (A_i + z_i Rk) / scale_i + offset_i, so q . k_i = (q . A_i + z_i (Rk q)) / scale_i
    + q . offset_i; and with v_i = (B_i + z_i Rv) / scale_i, sum_i p_i v_i =
    (p / scale) @ B + ((p / scale) @ z) @ Rv: products of the image tokens with
    heads x tokens columns instead of 128.
    """
    heads = attn.num_heads
    q = _split_heads(attn.q_proj(q_in)[0], heads)  # heads x T x d
    rk = _split_heads(image.coefficients(attn.k_proj.weight, attn.k_proj.bias), heads)  # heads x rank x d
    rv = _split_heads(image.coefficients(attn.v_proj.weight, attn.v_proj.bias), heads)
    logits = q @ keys.transpose(-2, -1) + (q @ rk.transpose(-2, -1)) @ image.z.T  # heads x T x N
    if image.scale is not None:
        logits = logits / image.scale.T
    if keys_offset is not None:
        logits = logits + q @ keys_offset.transpose(-2, -1)
    p = _softmax(logits / math.sqrt(q.shape[-1]))
    if image.scale is not None:
        p = p / image.scale.T
    out = p @ values + (p @ image.z) @ rv  # heads x T x d
    return attn.out_proj(out.transpose(0, 1).reshape(1, q.shape[1], -1))


def _image_to_token(attn: nn.Module, queries: Tensor, k_in: Tensor, v_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The image attends to the tokens, as a low-rank update of the image tokens.

    queries: N x D (projected image queries); k_in, v_in: 1 x T x C.
    Returns p (N x heads*(T-1)), u (heads*(T-1) x C) and const (C) with
    attn(...) = p @ u + const. Each token's value mapped by its head's slice of
    the output projection is w_t; a head's weights sum to 1, so its output
    sum_t p_t w_t = w_last + sum_{t<last} p_t (w_t - w_last): one column fewer per head.
    """
    heads = attn.num_heads
    q = _split_heads(queries, heads)  # heads x N x d
    k = _split_heads(attn.k_proj(k_in)[0], heads)  # heads x T x d
    v = _split_heads(attn.v_proj(v_in)[0], heads)
    p = _softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]))  # heads x N x T
    wo = attn.out_proj.weight  # C x D
    wo_heads = wo.T.reshape(heads, -1, wo.shape[0])  # heads x d x C
    w = v @ wo_heads  # heads x T x C
    last = w[:, -1:]  # heads x 1 x C
    u = (w[:, :-1] - last).reshape(-1, wo.shape[0])
    p = p[:, :, :-1].transpose(0, 1).reshape(p.shape[1], -1)
    return p, u, last.sum(dim=(0, 1)) + attn.out_proj.bias


class _Projections(nn.Module):
    """The image-side linear maps of the decoder and the per-image tensors they need.

    Holds, as buffers, the weights with the LayerNorm gains folded in
    (W diag(gain)) stacked in ``PREPARED_NAMES`` order, and the positional
    encoding's projections.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        transformer = sam.mask_decoder.transformer
        pe = _flat_tokens(sam.prompt_encoder.get_dense_pe()).detach()  # N x C
        upscaling_weight, _ = _centred_upscaling(sam.mask_decoder.output_upscaling[0])
        gain = torch.ones(pe.shape[1])
        weights, pe_terms = [], {}
        for index, layer in enumerate(transformer.layers):
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            weights += [t2i.k_proj.weight * gain, t2i.v_proj.weight * gain, i2t.q_proj.weight * gain]
            pe_terms[f"layer{index}_keys"] = pe @ t2i.k_proj.weight.T
            pe_terms[f"layer{index}_queries"] = pe @ i2t.q_proj.weight.T
            gain = gain * layer.norm4.weight
        final = transformer.final_attn_token_to_image
        weights += [final.k_proj.weight * gain, final.v_proj.weight * gain, upscaling_weight * gain]
        pe_terms["final_keys"] = pe @ final.k_proj.weight.T
        self.names = prepared_names(len(transformer.layers))
        # Token->image keys and values are read per head: kept heads x N x d.
        self.heads = {f"layer{index}_{kind}": layer.cross_attn_token_to_image.num_heads
                      for index, layer in enumerate(transformer.layers) for kind in ("keys", "values")}
        self.heads |= {"final_keys": final.num_heads, "final_values": final.num_heads}
        self.widths = [w.shape[0] for w in weights]
        self.register_buffer("stacked", torch.cat(weights, dim=0).detach())
        # Layer 0's tokens are not normalized (scale 1), so its positional term joins the per-image tensor.
        self.first_layer_pe = {name: pe_terms.pop(name).detach() for name in ("layer0_keys", "layer0_queries")}
        for name, value in pe_terms.items():
            if name in self.heads:
                value = _split_heads(value, self.heads[name])
            self.register_buffer(f"pe_{name}", value.detach())

    def per_image(self, image_embeddings: Tensor) -> dict[str, Tensor]:
        """1 x C x 64 x 64 -> {name: N x D}: one 4096 x 256 x 1280 product, split."""
        e = _flat_tokens(image_embeddings)
        parts = dict(zip(self.names[1:], torch.split(e @ self.stacked.T, self.widths, dim=1)))
        parts["image_tokens"] = e
        for name, pe_term in self.first_layer_pe.items():
            parts[name] = parts[name] + pe_term
        for name, heads in self.heads.items():
            parts[name] = _split_heads(parts[name], heads)
        return parts

    def pe_term(self, name: str) -> Tensor | None:
        return getattr(self, f"pe_{name}", None)


class PrepareOnnx(nn.Module):
    """image_embeddings 1 x 256 x 64 x 64 -> the per-image tensors, each 1 x 4096 x D (PREPARED_NAMES order)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.projections = _Projections(sam)

    def forward(self, image_embeddings: Tensor) -> tuple[Tensor, ...]:
        """See the module docstring."""
        parts = self.projections.per_image(image_embeddings)
        return tuple(parts[name][None] for name in self.projections.names)


class PreparedDecoderOnnx(DecoderOnnx):
    """decoder.onnx's inputs plus the per-image tensors -> decoder.onnx's outputs, factored as above."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__(sam)
        self.projections = _Projections(sam)
        self.names = self.projections.names

    def forward(  # type: ignore[override]
        self,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor,
        *prepared: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(iou_predictions, low_res_masks, display_masks, areas) as DecoderOnnx;
        prepared: the tensors of ``PrepareOnnx`` for this image, 1 x N x D each."""
        hs, image, state = self.attend(point_coords, point_labels, mask_input, has_mask_input, prepared)
        low_res_masks = self.masks(hs, image, state["upscaling"])
        iou_predictions = self.mask_decoder.iou_prediction_head(hs[:, 0])
        return self.with_display(iou_predictions, low_res_masks, orig_im_size)

    def attend(
        self, point_coords: Tensor, point_labels: Tensor, mask_input: Tensor, has_mask_input: Tensor,
        prepared: tuple[Tensor, ...],
    ) -> tuple[Tensor, FactoredImage, dict[str, Tensor]]:
        """Prompt encoding and the two-way transformer -> (tokens 1 x T x C, image tokens, per-image tensors by name)."""
        state = {name: value.squeeze(0) for name, value in zip(self.names, prepared)}
        tokens = torch.cat(
            [
                self.mask_decoder.iou_token.weight,
                self.mask_decoder.mask_tokens.weight,
                self.prompt_encoder._embed_points(point_coords, point_labels, pad=False)[0],
            ],
            dim=0,
        )[None]  # 1 x T x C
        image = self.embed_image(state["image_tokens"], mask_input, has_mask_input)
        hs, image = self.transformer(tokens, image, state)
        return hs, image, state

    def embed_image(self, image_tokens: Tensor, mask_input: Tensor, has_mask_input: Tensor) -> FactoredImage:
        """The transformer's input s = e + dense prompt, as e + (has * h) @ Wm^T + c; image_tokens: e, N x C.

        h (N x 16) is the mask downscaler's output before its last 1x1 convolution
        (Wm, bm); c = has * bm + (1 - has) * no_mask_embed: the blend of ``embed_mask``.
        Without a mask input (has 0) h is N x 0, so every low-rank product is 16
        columns narrower, and the downscaler runs on the first 4 rows of ``mask_input``
        only (one output row; ONNX Conv takes no empty input): about 6% of a click.
        """
        pe = self.prompt_encoder
        last = pe.mask_downscaling[-1]
        used = (has_mask_input != 0).to(torch.int64)  # [1]: 1 with a mask input, else 0
        stride = self.low_res_size // self.prompt_encoder.image_embedding_size[0]  # 4 mask rows per token row
        rows = _leading(mask_input, stride + used * (self.low_res_size - stride), axis=2)  # 1 x 1 x (256 or 4) x 256
        h = _flat_tokens(pe.mask_downscaling[:-1](rows)) * has_mask_input  # (N or 64) x 16
        h = _leading(h, used * image_tokens.shape[0], axis=0)  # N x 16, or 0 x 16
        h = _flush_tiny(h.reshape(image_tokens.shape[0], -1))  # N x 16, or N x 0
        wm = last.weight[:, :, 0, 0]  # C x 16
        wm = _leading(wm, used * wm.shape[1], axis=1)  # C x 16 used
        c = has_mask_input * last.bias + (1 - has_mask_input) * pe.no_mask_embed.weight[0]
        ones = torch.ones(h.shape[0], 1)
        return FactoredImage(
            z=torch.cat([ones, h], dim=1), r=torch.cat([c[None], wm.T], dim=0), scale=None,
            base=image_tokens, pending=((ones, c[None]), (h, wm.T)),
        )

    def transformer(
        self, point_embedding: Tensor, image: FactoredImage, state: dict[str, Tensor]
    ) -> tuple[Tensor, FactoredImage]:
        """``TwoWayTransformer.forward`` with the image side factored -> (tokens 1 x T x C, image tokens)."""
        transformer = self.mask_decoder.transformer
        pe = point_embedding
        queries = point_embedding
        for index, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)

            attended = self.token_to_image(layer.cross_attn_token_to_image, queries + pe, image, state, f"layer{index}")
            queries = layer.norm2(queries + attended)

            queries = layer.norm3(queries + layer.mlp(queries))

            i2t = layer.cross_attn_image_to_token
            image_queries = self.project(image, i2t.q_proj, state, f"layer{index}_queries")
            p, u, const = _image_to_token(i2t, image_queries, queries + pe, queries)
            image = image.add(p, u, const).layer_norm(layer.norm4)

        attended = self.token_to_image(transformer.final_attn_token_to_image, queries + pe, image, state, "final")
        queries = transformer.norm_final_attn(queries + attended)
        return queries, image

    def token_to_image(
        self, attn: nn.Module, q_in: Tensor, image: FactoredImage, state: dict[str, Tensor], prefix: str
    ) -> Tensor:
        keys, values = state[f"{prefix}_keys"], state[f"{prefix}_values"]
        return _token_to_image(attn, q_in, image, keys, values, self.projections.pe_term(f"{prefix}_keys"))

    def project(self, image: FactoredImage, linear: nn.Linear, state: dict[str, Tensor], name: str) -> Tensor:
        return image.project(linear.weight, linear.bias, state[name], self.projections.pe_term(name))

    def masks(self, hs: Tensor, image: FactoredImage, per_image: Tensor) -> Tensor:
        """``output_upscaling`` + hypernetworks, per token: -> logits 1 x 4 x 4H x 4W."""
        return self.shuffle(self.mask_features(image, per_image) @ self.hypernetworks(hs).T)

    def mask_features(self, image: FactoredImage, per_image: Tensor) -> Tensor:
        """``output_upscaling`` per token: -> N x 16 x C/8, layout y x (a b a2 b2) x channels."""
        w1, b1 = self.upscaling_weights()
        side = self.prompt_encoder.image_embedding_size[0]
        return self.upscale(image.numerator(w1, b1, per_image), image.scale, side * side)

    def upscaling_weights(self) -> tuple[Tensor, Tensor]:
        """The first upscaling convolution as a centred per-token map (``_centred_upscaling``)."""
        return _centred_upscaling(self.mask_decoder.output_upscaling[0])

    def upscale(self, numerator: Tensor, scale: Tensor | None, tokens: int = -1) -> Tensor:
        """The upscaling from the first convolution's numerator y = x * scale (tokens x 4C/4, scale
        tokens x 1 or None) -> tokens x 16 x C/8; tokens -1: however many the numerator has.

        Layout y x (a b) x channels, then (a b a2 b2) x channels: no pixel shuffle until the end.
        The first convolution's output x = y / scale has mean 0 over a pixel's channels
        (``_centred_upscaling``), so its LayerNorm2d is y / sqrt(mean(y^2) + eps scale^2) * g + b:
        no mean, no division of the whole map by the scale.
        """
        conv1, norm, act1, conv2, act2 = self.mask_decoder.output_upscaling
        w2, b2 = _transposed_conv_as_linear(conv2)

        def per_pixel(x: Tensor, pixels: int, channels: int) -> Tensor:  # tokens x (pixels channels) -> 3-d
            return x.reshape(tokens, pixels, -1) if tokens >= 0 else x.reshape(-1, pixels, channels)

        y = per_pixel(numerator, 4, conv1.out_channels)  # tokens x (a b) x C/4
        floor = norm.eps if scale is None else norm.eps * scale.square()[:, :, None]  # tokens x 1 x 1
        x = act1(y / torch.sqrt((y * y).mean(dim=-1, keepdim=True) + floor) * norm.weight + norm.bias)
        return per_pixel(act2(x @ w2.T + b2), 16, conv2.out_channels)  # tokens x (a b a2 b2) x C/8

    def hypernetworks(self, hs: Tensor) -> Tensor:
        """Each mask token's hypernetwork output: 1 x T x C tokens -> 4 x C/8."""
        mlps = self.mask_decoder.output_hypernetworks_mlps
        return torch.stack([mlp(hs[0, 1 + i]) for i, mlp in enumerate(mlps)], dim=0)

    def shuffle(self, masks: Tensor) -> Tensor:
        """N x 16 x K (y x (a b a2 b2) x token) -> logits 1 x K x 4H x 4W: the one pixel shuffle."""
        side = self.prompt_encoder.image_embedding_size[0]
        masks = masks.reshape(side, side, 2, 2, 2, 2, -1).permute(6, 0, 2, 4, 1, 3, 5)  # token, y a a2, x b b2
        return masks.reshape(1, -1, 4 * side, 4 * side)


def export_prepared_decoder(
    sam: nn.Module, prepare_path: str | Path, decoder_path: str | Path, *, quantize: bool = False
) -> tuple[Path, Path]:
    """Write decoder_prepare.onnx (always fp32) and decoder_prepared.onnx (quantized if asked);
    each appears atomically. Returns both paths."""
    prepare_path, decoder_path = Path(prepare_path), Path(decoder_path)
    image_embeddings = example_inputs()[0]
    prepare = PrepareOnnx(sam)
    with torch.no_grad():
        prepared = prepare(image_embeddings)
    shapes = {name: tuple(value.shape) for name, value in zip(PREPARED_NAMES, prepared)}
    prepare_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prepare_path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "decoder_prepare.onnx"
        trace_to_onnx(prepare, (image_embeddings,), traced, ["image_embeddings"], shapes, {})
        _finish(traced, prepare_path, quantize=False)
    export_click_graph(sam, PreparedDecoderOnnx(sam), decoder_path, OUTPUT_SHAPES, DISPLAY_AXES, quantize=quantize)
    return prepare_path, decoder_path


def export_click_graph(
    sam: nn.Module,
    module: PreparedDecoderOnnx,
    path: str | Path,
    output_shapes: dict[str, tuple[int | str, ...]],
    output_axes: dict[str, dict[int, str]],
    *,
    quantize: bool = False,
) -> Path:
    """Trace ``module`` (of ``sam``), a graph taking ``PREPARED_INPUTS`` (the prompt and the per-image tensors), to ``path``
    (atomically; quantized if asked), with the per-prompt repeats that never repeat dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prepare = PrepareOnnx(sam)
    base = example_inputs()
    with torch.no_grad():
        prepared = prepare(base[0])
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / path.name
        trace_to_onnx(module, (*base[1:], *prepared), traced, list(PREPARED_INPUTS), output_shapes, POINT_AXES | output_axes)
        probes = []
        for args in probe_inputs():
            with torch.no_grad():
                state = prepare(args[0])
            named = dict(zip(PREPARED_INPUTS, (*args[1:], *state)))
            probes.append({name: value.numpy() for name, value in named.items()})
        drop_unit_tiles(traced, probes)
        _finish(traced, path, quantize)
    return path
