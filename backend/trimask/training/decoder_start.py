"""A built start for SAM's prompt encoder and mask decoder: the "code-match" decoder.

Trained from random weights, SAM's decoder learns to answer a click with its subpart, part and
whole slowly (see the model card). This module sets the weights of the untouched architecture so
that, from step 0, it answers a click by matching region codes that the image encoder writes into
fixed channels of the embedding:

- channels ``CODE[l]`` (16 each) hold a code of the subpart (l = 0), part (1) and whole (2) at each
  cell (``trimask.training.code_pretrain`` trains the tiny encoder to write them);
- the prompt encoder's positional frequencies ``FETCH`` are chosen so that the first layer's
  token->image attention of a point token is sharp at its click: it fetches the codes there;
- the first layer's image->token attention lets every image cell compare its codes, one head per
  level, with the point token's; cells that match attend to it and receive its label (+1 for a
  positive click, -1 for a negative one) in channel ``MARK[l]``; the others attend to the IoU token,
  which acts as a sink (a fixed threshold);
- the upscaling carries the three marks to the 4x grid and multimask token 1 / 2 / 3 reads the
  subpart / part / whole mark (token 0, the single-mask output, the whole).

Everything else passes through (residuals and norms). The IoU head, box prompts and the mask input
are left for training, which takes over from this start (the model card says what SAM's loss does
to it). Nothing here changes the architecture or the product path (ONNX decoder, browser).
"""
from __future__ import annotations

import math

import torch

from trimask.models.sam import Sam

# Eight 2-D frequencies (in the prompt encoder's [-1, 1] coordinates) whose cosine kernel
# sum_j cos(2 pi f_j . d) peaks at d = 0 with a margin of about 1.6 (out of 8) over every cell 1.5 or
# more cells away on the 64 x 64 grid; picked by random search over magnitudes 0.15..12.
FETCH_FREQUENCIES = (
    (-0.155, -0.42, 0.597, -0.612, 2.611, 0.509, -5.651, 5.982),
    (0.396, 0.077, 0.409, 3.004, 1.441, 5.53, 0.857, 5.807),
)
FETCH = tuple(range(8))  # their columns: embedding channels 0..7 (sin) and 128..135 (cos)
CODE_DIM = 16
CODE = tuple(tuple(range(16 + CODE_DIM * lv, 16 + CODE_DIM * (lv + 1))) for lv in range(3))  # 16..63
CODE_CHANNELS = tuple(c for lv in CODE for c in lv)
MARK = (64, 65, 66)
LABEL, SINK = 70, 72
MASK_TYPES = (73, 74, 75, 76)
BOX_TYPES = (77, 78)
PAD_TYPE = 79
DENSE = 90  # a constant in every image cell keeps the LayerNorms of empty cells from amplifying noise
# Positional columns set to frequency 0 (their sin channels 0, cos channels 1), so the channels the
# layout uses carry no position; columns 96..127 keep their random frequencies for everything else.
ZERO_FREQUENCY = tuple(range(8, 96))

# Gains, tuned on oracle codes (random unit vectors x 4 per region and level): best-of-three IoU
# 0.21 / 0.78 / 0.93 for subpart / part / whole on 10 held-out scenes with no training at all.
TYPE_SIZE = 8.0  # the type channels' value in the token embeddings
FETCH_SCALE = math.sqrt(20.0)  # query and key gain of the fetch: logit margin ~ 20 * 1.6 / 4 = 8
CODE_SCALE = 2.0  # query and key gain of the code comparison
SINK_GAIN = 1.33  # the sink's logit: about half a matching cell's
MARK_GAIN = 4.0
UP_MARK, UP_CONST = 3.0, 10.0  # first upscaling conv: mark gain and the constant channel's value
READ_GAIN, READ_BIAS = 1.0, 1.35  # mask logit = READ_GAIN * mark - READ_BIAS * const (about +-4)


def _one_hot(channel: int, value: float, dim: int = 256) -> torch.Tensor:
    e = torch.zeros(dim)
    e[channel] = value
    return e


def _zero(*modules: torch.nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.zero_()


@torch.no_grad()
def code_match_start(sam: Sam) -> None:
    """Set ``sam``'s prompt encoder and mask decoder (embed dim 256, depth-2 transformer) in place."""
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    tr = dec.transformer
    if dec.transformer_dim != 256 or len(tr.layers) != 2:
        raise ValueError("the code-match start is laid out for SAM's decoder: embed dim 256, two layers")
    g = pe.pe_layer.positional_encoding_gaussian_matrix
    g[:, list(FETCH)] = torch.tensor(FETCH_FREQUENCIES, dtype=g.dtype)
    g[:, list(ZERO_FREQUENCY)] = 0.0
    # Token embeddings: one type channel each (points: +-TYPE_SIZE in LABEL).
    pe.point_embeddings[0].weight[0] = _one_hot(LABEL, -TYPE_SIZE)
    pe.point_embeddings[1].weight[0] = _one_hot(LABEL, TYPE_SIZE)
    pe.point_embeddings[2].weight[0] = _one_hot(BOX_TYPES[0], TYPE_SIZE)
    pe.point_embeddings[3].weight[0] = _one_hot(BOX_TYPES[1], TYPE_SIZE)
    pe.not_a_point_embed.weight[0] = _one_hot(PAD_TYPE, TYPE_SIZE)
    pe.no_mask_embed.weight[0] = _one_hot(DENSE, 10.0)
    last = pe.mask_downscaling[-1]
    _zero(last)  # the mask input starts ignored ...
    last.bias[DENSE] = 10.0  # ... but keeps the constant
    dec.iou_token.weight[0] = _one_hot(SINK, TYPE_SIZE)
    for i, ch in enumerate(MASK_TYPES):
        dec.mask_tokens.weight[i] = _one_hot(ch, TYPE_SIZE)
    types = (LABEL, SINK, *MASK_TYPES, *BOX_TYPES, PAD_TYPE)
    first, second = tr.layers
    # Layer 1 self-attention (no residual in SAM's first layer): every token attends to the tokens
    # of its own type and keeps its type channel.
    sa = first.self_attn
    _zero(sa)
    for j, ch in enumerate(types):
        sa.q_proj.weight[j, ch] = sa.k_proj.weight[j, ch] = 1.0
        sa.v_proj.weight[j, ch] = sa.out_proj.weight[ch, j] = 1.0
    # Layer 1 token->image: heads 0..2 fetch the level codes under the click.
    t2i = first.cross_attn_token_to_image
    _zero(t2i)
    for lv in range(3):
        for j, col in enumerate(FETCH):
            for off, ch in ((0, col), (8, 128 + col)):
                t2i.q_proj.weight[16 * lv + off + j, ch] = FETCH_SCALE
                t2i.k_proj.weight[16 * lv + off + j, ch] = FETCH_SCALE
        for j, ch in enumerate(CODE[lv]):
            t2i.v_proj.weight[16 * lv + j, ch] = 1.0
            t2i.out_proj.weight[ch, 16 * lv + j] = 1.0
    _zero(first.mlp.lin2)
    # Layer 1 image->token: head l compares level-l codes (15 of the head's 16 channels); its 16th
    # channel gives the IoU token a fixed logit (the sink); the value is the point's label.
    i2t = first.cross_attn_image_to_token
    _zero(i2t)
    for lv in range(3):
        for j, ch in enumerate(CODE[lv][:15]):
            i2t.q_proj.weight[16 * lv + j, ch] = CODE_SCALE
            i2t.k_proj.weight[16 * lv + j, ch] = CODE_SCALE
        i2t.q_proj.bias[16 * lv + 15] = SINK_GAIN
        i2t.k_proj.weight[16 * lv + 15, SINK] = 1.0
        i2t.v_proj.weight[16 * lv, LABEL] = 1.0
        i2t.out_proj.weight[MARK[lv], 16 * lv] = MARK_GAIN
    # Layer 2 and the final attention pass through.
    _zero(second.self_attn, second.cross_attn_token_to_image, second.cross_attn_image_to_token, second.mlp.lin2,
          tr.final_attn_token_to_image)
    # Upscaling: marks -> channels 0..2; a constant channel keeps LayerNorm2d close to linear.
    up1, _, _, up2, _ = dec.output_upscaling
    _zero(up1, up2)
    for lv in range(3):
        up1.weight[MARK[lv], lv] = UP_MARK
        up2.weight[lv, lv] = 1.0
    up1.bias[63] = UP_CONST
    up2.bias[31] = 1.0
    # Hypernetworks: constant readers (token 0 and 3: whole; 1: subpart; 2: part).
    for k, mlp in enumerate(dec.output_hypernetworks_mlps):
        level = 2 if k == 0 else k - 1
        out = mlp.layers[-1]
        _zero(out)
        out.bias[level] = READ_GAIN
        out.bias[31] = -READ_BIAS
