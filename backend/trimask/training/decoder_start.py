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
  subpart / part / whole mark;
- a box: two low positional frequencies make four heads of the same attention half-planes (a cell
  attends to a corner token when it lies on the inner side of that corner), which sum in ``BOXIN``;
  the second layer's image->token attention marks the cells inside all four and on an object (the
  encoder's objectness channel ``OBJ``) in ``BOXMARK``;
- the mask input (the previous answer) is carried, as its sign per cell, in ``PREV``; signed marks
  reach the 4x grid as (x, -x) pairs, since GELU(x) - GELU(-x) = x;
- sub-cell edges: an encoder with a pattern head also writes, per cell and level, which of the cell's
  4 x 4 pixels of the 256 x 256 grid lie outside the cell's own region (``PATTERN``); the upscaling's
  two transposed convolutions place each pixel's value at its position and switch the level's mark
  off there (``pattern_gates``), so a mask can follow an edge inside a cell;
- second codes: a cell's codes are those of the region at its centre, so a region that only reaches into
  a cell would lose those pixels; the encoder also writes, per cell and level, the code of the
  neighbour towards the cell's outside pixels (``SECOND``), the second layer's image->token attention
  compares them with the click's, and the upscaling adds that mark where the pattern says outside
  (``second_marks``);
- locality: a broad positional kernel around each click tells every cell how far it is from the clicks
  (``FAR``), and the subpart candidate is switched off far from them (``subpart_locality``); the part
  candidate needs the whole's mark too (``part_within_whole``);
- token 0, the single-mask output, reads the previous answer plus the clicks' regions (so a positive
  click adds its part, a negative one removes its subpart) plus the box mark, with the weights
  ``SINGLE_READ`` (``set_single_read``; ``trimask.training.read_calibration`` chooses them for the codes
  an encoder has learned); the last upscaling's unused channels ``UP_HIDDEN`` can hold hidden units that
  token 0 also reads, fitted to its answers with SAM's mask loss (``trimask.training.single_fit``), which
  make that rule nonlinear;
- negative marks: each level's mark of the negative clicks alone (``NEG_MARK``, ``negative_marks``), which
  the fitted units also read, since a cell that a positive and a negative click both match has a mark of
  about 0, as one that no click matches;
- the final attention gives the tokens each mark's mean over the image (``AREA``), and the IoU token
  each mark's strength and objectness over the candidate itself (``STRENGTH``), for the IoU head.

Everything else passes through (residuals and norms). The IoU head is left for training
(``trimask.training.iou_fit`` fits it to the answers; the model card says what it measured). Nothing here changes the architecture
or the product path (ONNX decoder, browser).
"""
from __future__ import annotations

import math

import torch

from trimask.models.sam import Sam
from trimask.models.tiny_encoder import CODE_OFFSET, SECOND_SCALE
from trimask.training.scenes import LEVELS

# Eight 2-D frequencies (in the prompt encoder's [-1, 1] coordinates) whose cosine kernel
# sum_j cos(2 pi f_j . d) peaks at d = 0 with a margin of about 1.6 (out of 8) over every cell 1.5 or
# more cells away on the 64 x 64 grid; picked by random search over magnitudes 0.15..12.
FETCH_FREQUENCIES = (
    (-0.155, -0.42, 0.597, -0.612, 2.611, 0.509, -5.651, 5.982),
    (0.396, 0.077, 0.409, 3.004, 1.441, 5.53, 0.857, 5.807),
)
FETCH = tuple(range(8))  # their columns: embedding channels 0..7 (sin) and 128..135 (cos)
CODE_DIM = 16
COMPARED = 15  # of a code's channels, those the comparison heads read (the 16th of each head is its sink's)
CODE = tuple(tuple(range(CODE_OFFSET + CODE_DIM * lv, CODE_OFFSET + CODE_DIM * (lv + 1))) for lv in range(3))  # 16..63
CODE_CHANNELS = tuple(c for lv in CODE for c in lv)
MARK = (64, 65, 66)
LABEL, SINK = 70, 72
MASK_TYPES = (73, 74, 75, 76)
BOX_TYPES = (77, 78)
PAD_TYPE = 79
BOXIN, BOXMARK = 67, 68
BOX_STATE = (80, 81)  # where the first layer's self-attention keeps the corner tokens' types
OBJ = 82  # objectness, written by the encoder: OBJECT_VALUE on objects, 0 elsewhere
OBJECT_VALUE = 4.0
PREV = 83  # the sign of the mask input at each cell
AREA = (100, 101, 102, 103)  # in the tokens: each mark's mean over the image (subpart, part, whole, box)
AREA_GAIN = 4.0
# In the tokens: each mark's mean where it is strongest, and objectness there (subpart, part, whole, box)
STRENGTH = (104, 105, 106, 107)
STRENGTH_OBJECT = (108, 109, 110, 111)
STRENGTH_SHARPNESS = 4.0  # attention logit of a cell with a full mark (others 0): about e^4 = 55 times the weight
DENSE = 90  # a constant in every image cell keeps the LayerNorms of empty cells from amplifying noise
ZREF = 10  # a channel that is 0 in every positional encoding: subtracting it cancels a LayerNorm's shift
CORNER_STATE = 16.0  # a corner token's kept type after the first LayerNorm (one channel of 8 -> ~16)
# Two low frequencies, one per axis (columns 8 and 9): over [-1, 1] their phase stays within a quarter
# turn of the box's corners, so sin(phase difference) orders every cell against a corner.
BOX_COLUMNS = (8, 9)
BOX_FREQUENCY = 0.08
# Positional columns set to frequency 0 (their sin channels 0, cos channels 1), so the channels the
# layout uses carry no position; columns 96..127 keep their random frequencies for everything else.
ZERO_FREQUENCY = tuple(range(10, 96))

# Gains, tuned on oracle codes (a random 16-d vector x 4 per region and level, objectness 4): with no
# training at all, on 5 held-out scenes, best-of-three IoU 0.62 / 0.90 / 0.95 for subpart / part /
# whole, mIoU 0.57 / 0.74 / 0.84 after 1 / 3 / 5 clicks, a box alone 0.26 / 0.70 / 0.86.
TYPE_SIZE = 8.0  # the type channels' value in the token embeddings
FETCH_SCALE = math.sqrt(20.0)  # query and key gain of the fetch: logit margin ~ 20 * 1.6 / 4 = 8
CODE_SCALE = 2.0  # query and key gain of the code comparison
SINK_GAIN = 1.33  # the sink's logit: about half a matching cell's
MARK_GAIN = 0.25  # small beside DENSE, so LayerNorms scale marks, box and mask input alike
UP_MARK, UP_CONST = 3.0, 40.0  # first upscaling conv: mark gain and the constant channel's value
UP1_CONSTANT = 63  # the first upscaling's constant channel (the box mark is its channel UP_BOX, as in the 4x grid)
READ_GAIN, READ_BIAS = 2.0, 2.5  # multimask logit = READ_GAIN * mark - READ_BIAS * const (about +-2)
BOX_SHARPNESS, BOX_PHASE = 290.0, 0.5  # half-plane logit ~4 per cell; the phase sets its edge at the corner
BOX_OBJECT_WEIGHT, BOX_THRESHOLD, BOX_AND_GAIN = 2.0, 5.3, 20.0  # 4 half-planes + 2 x objectness > 5.3
# Token 0 reads, in units of a full mark at the 4x grid (measured on oracle codes: 2.1 for a mark,
# 1.84 for the box mark, 0.65 for the mask input): logit = SINGLE_GAIN * (3 subpart + 3 part +
# 1.5 whole + 2 box + 2 previous - 1). The start's weights, set on oracle codes; for learned codes
# ``trimask.training.read_calibration`` measures and sets them (``set_single_read``).
SINGLE_READ = {"subpart": 3.0, "part": 3.0, "whole": 1.5, "box": 2.0, "prev": 2.0, "bias": 1.0}
SINGLE_GAIN = 2.0
UNIT_MARK, UNIT_BOX, UNIT_PREV, UNIT_CONST = 2.1, 1.84, 0.65, 0.84
# The 4x grid's channels: marks (0..2) and their negative twins (4..6), the box mark (3), the mask
# input and its twin (7, 8), the constant (31).
UP_NEGATIVE = (4, 5, 6)
UP_BOX, UP_PREV, UP_CONSTANT = 3, (7, 8), 31
UP_SECOND = ((9, 10), (11, 12), (13, 14))  # the level-l second mark where outside and its twin (``SECOND``)
SINGLE_READ_CHANNELS = (0, 1, 2, *UP_NEGATIVE, UP_BOX, *UP_PREV, UP_CONSTANT,
                        *(c for pair in UP_SECOND for c in pair))  # all that token 0 reads
# Sub-cell patterns: channels PATTERN[l] (16 each, 160..207) say, for each of a cell's 4 x 4 pixels of
# the 4x grid (row by row), whether it lies outside the cell's own level-l region (up to 1) or not
# (0). The first upscaling conv places each pixel's value at its 2 x 2 position (channels
# UP_PATTERN.., with twins), the second subtracts it from the level's mark at its own position, so an
# outside pixel takes no mark; the whole's pattern also gates the mask input (not the box mark: gated,
# boxes around wholes lost 0.02 IoU to the learned patterns' false "outside"s). An encoder that writes
# nothing there (0) gets the cell's mark on all 16 pixels, as before.
PATTERN = tuple(tuple(range(160 + 16 * lv, 176 + 16 * lv)) for lv in range(3))
UP_PATTERN = 9  # 9..32: per level 4 sub-positions and their negative twins
PATTERN_UP_GAIN, PATTERN_GATE = 3.0, 40.0
SUBPIXELS = ((0, 0), (0, 1), (1, 0), (1, 1))
# Second codes (``second_marks``): channels SECOND[l] hold, per cell and level, the code of the region that
# the cell's outside pixels belong to (the tiny encoder's ``neighbour_codes``, at SECOND_SCALE). The
# second layer's image->token heads 1..3 compare them with the click's codes like the first layer's heads
# 0..2 compare a cell's own codes, into SECOND_MARK; the upscaling adds that mark at the pixels the
# level's pattern calls outside (4x-grid pairs UP_SECOND), where the cell's own mark is switched off.
SECOND = tuple(tuple(range(208 + 16 * lv, 224 + 16 * lv)) for lv in range(3))
SECOND_FREQUENCY = tuple(range(96, 128))  # positional columns set to 0, so SECOND's positional part is 1
SECOND_MARK = (84, 85, 86)
UP_SECOND_IN = (33, 35, 37)  # the first upscaling's level-l second mark and its twin (+1)
SECOND_SIGMA = 0.76  # a cell's standard deviation before the first layer's last norm (measured: on objects)
# The gate's logit, SECOND_GATE x (a pattern value of 1 reaches the first upscaling as about 0.49) - SECOND_OPEN:
# open from a pattern of about 0.33, where the cell's own mark is mostly off (its gate is 40 x 0.49 x pattern).
SECOND_GATE, SECOND_OPEN = 25.0, 4.0
SECOND_READ = 0.7  # the second mark counts 1-2 times a mark where open; read it a little lower
# Subpart locality (``subpart_locality``): a clicked subpart's code also matches cells far from the click
# (other subparts of its colour; measured on learned codes: the false pixels lie a median 23 pixels, six
# cells, from the subpart). Five positional columns make a broad kernel around each click (five cosines
# of one frequency, 36 degrees apart, falling to half LOCAL_RADIUS cells away); head 4 of the second
# image->token attention gives every cell its attention to the IoU token (a sink) against the point tokens
# scored by that kernel, i.e. how far it is from every click, in FAR; multimask token 1 reads copies of
# the subpart's marks (UP_LOCAL) from which the upscaling subtracts it. Token 0 keeps the plain marks.
LOCAL_COLUMNS = (11, 12, 13, 14, 15)
LOCAL_RADIUS = 3.0
LOCAL_PEAK = 16.0  # the kernel's logit at a click; the sink's is half of it
FAR = 87
FAR_GAIN = 0.25  # FAR's size where no click is near
UP_FAR = (39, 40)  # FAR and its twin in the first upscaling
UP_LOCAL = (15, 16, 17)  # the 4x grid's subpart mark, second mark and its twin, switched off far from clicks
# The 4x grid's channels that no layout rule uses: hidden units that token 0 reads, fitted to its answers
# with SAM's mask loss (``trimask.training.single_fit``); 0 in the start.
UP_HIDDEN = tuple(range(18, 31))
LOCAL_GATE = 70.0  # FAR reaches the 4x grid as about 0.1, so a far cell's marks lose about 7
# Part within its whole (``part_within_whole``): a clicked part's code also matches parts of other objects
# (measured on learned codes: 98 % of a part candidate's false pixels lie on objects, most of them other
# objects'). Multimask token 2 also reads the whole's marks at PART_WHOLE_READ of token 3's weight and
# needs PART_WHOLE_BIAS more (in READ_BIAS's units), so a cell needs both marks; a soft AND, chosen on
# held-out scenes against the hard AND of the two candidates (0.75 and 2.75; see the model card).
PART_WHOLE_READ, PART_WHOLE_BIAS = 0.75, 2.75
IOU_TYPE_KEY, IOU_TYPE_VALUE = 24.0, 16.0  # the IoU token's type channel after the norms: with its initial copy, alone
# Negative marks (``negative_marks``): a level's mark is the clicks' labels weighed by how well their codes match
# a cell's, so a cell matched by a positive and a negative click at that level (its part holds both) gets about
# 0, as a cell matched by none. Heads 5..7 of the second image->token attention compare each cell's level codes
# with the negative clicks' alone (each click's key holds its label: a negative click and the sink rise by
# NEG_SUPPRESS sinks' logits, a positive click falls by as much) into NEG_MARK, which the 2x grid carries as signed pairs (UP_NEG) for token 0's
# fitted units (``trimask.training.single_fit``): with the mark, they tell "both clicks" from "no click".
NEG_MARK = (88, 89, 91)
NEG_HEAD = 5
NEG_SUPPRESS = 2.0
LABEL_KEY = 22.4  # a point token's label channel in the second layer's keys (measured; the IoU token's type 23.7)
UP_NEG = (41, 43, 45)  # the 2x grid's level-l negative mark and its twin (+1)
NEG_GAIN = 0.25  # a quarter of a mark's size: a cell's norm and the 2x grid's LayerNorm change by about 1 %


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
    g[:, list(BOX_COLUMNS)] = torch.tensor([[BOX_FREQUENCY, 0.0], [0.0, BOX_FREQUENCY]], dtype=g.dtype)
    # Token embeddings: one type channel each (points: +-TYPE_SIZE in LABEL).
    pe.point_embeddings[0].weight[0] = _one_hot(LABEL, -TYPE_SIZE)
    pe.point_embeddings[1].weight[0] = _one_hot(LABEL, TYPE_SIZE)
    pe.point_embeddings[2].weight[0] = _one_hot(BOX_TYPES[0], TYPE_SIZE)
    pe.point_embeddings[3].weight[0] = _one_hot(BOX_TYPES[1], TYPE_SIZE)
    pe.not_a_point_embed.weight[0] = _one_hot(PAD_TYPE, TYPE_SIZE)
    pe.no_mask_embed.weight[0] = _one_hot(DENSE, 10.0)
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
        sa.q_proj.weight[j, ch] = sa.k_proj.weight[j, ch] = sa.v_proj.weight[j, ch] = 1.0
        # The corners keep their type elsewhere, so in later keys channels 77 / 78 hold only the prompt's.
        sa.out_proj.weight[BOX_STATE[BOX_TYPES.index(ch)] if ch in BOX_TYPES else ch, j] = 1.0
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
        for j, ch in enumerate(CODE[lv][:COMPARED]):
            i2t.q_proj.weight[16 * lv + j, ch] = CODE_SCALE
            i2t.k_proj.weight[16 * lv + j, ch] = CODE_SCALE
        i2t.k_proj.weight[16 * lv + 15, SINK] = 1.0
        i2t.v_proj.weight[16 * lv, LABEL] = 1.0
        i2t.out_proj.weight[MARK[lv], 16 * lv] = MARK_GAIN
    set_match_gains(sam, (SINK_GAIN,) * 3)
    _box_half_planes(i2t)
    # Layer 2: image->token head 0 marks the box; the rest and the final attention pass through.
    _zero(second.self_attn, second.cross_attn_token_to_image, second.cross_attn_image_to_token, second.mlp.lin2,
          tr.final_attn_token_to_image)
    _box_and_object(second.cross_attn_image_to_token)
    _mark_areas(tr.final_attn_token_to_image)
    mark_strengths(sam)
    _mask_input(pe.mask_downscaling)
    # Upscaling: marks -> channels 0..2 and their negative twins; a constant channel keeps
    # LayerNorm2d close to linear.
    up1, _, _, up2, _ = dec.output_upscaling
    _zero(up1, up2)
    for lv in range(3):
        _signed(up1, up2, MARK[lv], lv, UP_NEGATIVE[lv])
    _signed(up1, up2, PREV, *UP_PREV)
    up1.weight[BOXMARK, UP_BOX] = UP_MARK
    up2.weight[UP_BOX, UP_BOX] = 1.0
    up1.bias[UP1_CONSTANT] = UP_CONST
    up2.bias[UP_CONSTANT] = 1.0
    pattern_gates(sam)
    # Hypernetworks: constant readers (1: subpart; 2: part; 3: whole; 0: see SINGLE_READ).
    for k, mlp in enumerate(dec.output_hypernetworks_mlps):
        out = mlp.layers[-1]
        _zero(out)
        if k:
            out.bias[k - 1] = READ_GAIN
            out.bias[UP_CONSTANT] = -READ_BIAS
    set_single_read(sam, SINGLE_READ)
    second_marks(sam)
    subpart_locality(sam)
    part_within_whole(sam)


def _single_reader(sam: Sam) -> torch.Tensor:
    return sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias


@torch.no_grad()
def set_single_read(sam: Sam, reads: dict[str, float]) -> None:
    """Set what token 0, the single-mask output, reads: ``reads`` has the weights of ``SINGLE_READ``'s
    keys (the three levels' marks, the box mark and the previous answer, in units of a full mark, and
    the bias subtracted), every one of them (``trimask.training.read_calibration`` chooses them)."""
    if set(reads) != set(SINGLE_READ):
        raise ValueError(f"token 0 reads exactly {sorted(SINGLE_READ)}")
    out = _single_reader(sam)
    for lv, name in enumerate(LEVELS):
        out[lv] = SINGLE_GAIN * reads[name] / UNIT_MARK
        out[UP_NEGATIVE[lv]] = -out[lv]
    _single_second_reads(out)
    out[UP_BOX] = SINGLE_GAIN * reads["box"] / UNIT_BOX
    out[UP_PREV[0]] = SINGLE_GAIN * reads["prev"] / UNIT_PREV
    out[UP_PREV[1]] = -out[UP_PREV[0]]
    out[UP_CONSTANT] = -SINGLE_GAIN * reads["bias"] / UNIT_CONST


def reads_hidden_units(sam: Sam) -> bool:
    """Whether token 0 reads fitted hidden units (``UP_HIDDEN``): its reads are then fitted, not the rule's."""
    return bool(_single_reader(sam)[list(UP_HIDDEN)].any())


@torch.no_grad()
def clear_hidden_units(sam: Sam) -> None:
    """Remove fitted hidden units (``trimask.training.single_fit``): token 0 answers by its linear reads alone."""
    up2 = sam.mask_decoder.output_upscaling[3]
    up2.weight[:, list(UP_HIDDEN)] = 0.0
    up2.bias[list(UP_HIDDEN)] = 0.0
    _single_reader(sam)[list(UP_HIDDEN)] = 0.0


def _single_second_reads(out: torch.Tensor) -> None:
    """Token 0 reads each level's second mark (``second_marks``) as that level's mark, ``SECOND_READ`` lower."""
    for lv in range(3):
        out[UP_SECOND[lv][0]] = SECOND_READ * out[lv]
        out[UP_SECOND[lv][1]] = -SECOND_READ * out[lv]


def single_read(sam: Sam) -> dict[str, float]:
    """Token 0's read weights as ``set_single_read`` takes them."""
    out = _single_reader(sam).detach()
    reads = {name: float(out[lv]) * UNIT_MARK / SINGLE_GAIN for lv, name in enumerate(LEVELS)}
    reads.update(box=float(out[UP_BOX]) * UNIT_BOX / SINGLE_GAIN, prev=float(out[UP_PREV[0]]) * UNIT_PREV / SINGLE_GAIN,
                 bias=-float(out[UP_CONSTANT]) * UNIT_CONST / SINGLE_GAIN)
    return {k: round(v, 4) for k, v in reads.items()}


def _match_heads(sam: Sam) -> torch.Tensor:
    return sam.mask_decoder.transformer.layers[0].cross_attn_image_to_token.q_proj.bias


@torch.no_grad()
def set_match_gains(sam: Sam, gains: tuple[float, float, float]) -> None:
    """Set the sink's logit of the subpart, part and whole comparison heads: the higher it is, the
    closer a cell's code must be to the click's to take its mark (``trimask.training.match_calibration``
    chooses them for the codes an encoder has learned)."""
    bias = _match_heads(sam)
    second = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token.q_proj.weight
    negative = _negative_heads(sam)
    for lv, gain in enumerate(gains):
        bias[16 * lv + 15] = gain
        # second codes (``second_marks``): the same sink, read from DENSE after the first layer's norm
        second[16 * (1 + lv) + 15, DENSE] = gain * SECOND_SIGMA / 10.0
        if negative:  # and the negative marks' (``negative_marks``)
            second[negative[lv] + 15, DENSE] = gain * SECOND_SIGMA / 10.0


def match_gains(sam: Sam) -> tuple[float, float, float]:
    """The sink's logit of the three comparison heads (``set_match_gains``)."""
    bias = _match_heads(sam).detach()
    return tuple(round(float(bias[16 * lv + 15]), 4) for lv in range(3))


def _read_token(proj: torch.nn.Linear, row: int, channel: int, weight: float) -> None:
    """``proj``'s output ``row`` reads a token's ``channel`` minus ``ZREF``: a LayerNorm shifts every
    channel of a token alike, so the difference is the channel's own value."""
    proj.weight[row, channel] = weight
    proj.weight[row, ZREF] = -weight


def _signed(up1: torch.nn.Module, up2: torch.nn.Module, source: int, pos: int, neg: int) -> None:
    """Carry embedding channel ``source`` to 4x-grid channels ``pos`` (x) and ``neg`` (-x) through both GELUs."""
    up1.weight[source, pos] = UP_MARK
    up1.weight[source, neg] = -UP_MARK
    up2.weight[pos, pos] = up2.weight[neg, neg] = 1.0
    up2.weight[pos, neg] = up2.weight[neg, pos] = -1.0


@torch.no_grad()
def pattern_gates(sam: Sam) -> None:
    """Each level's pattern (``PATTERN``) switches its mark off at the pixels outside the cell's own region;
    the whole's also the mask input (see ``PATTERN``). Changes nothing for an encoder that leaves the
    pattern channels at 0; sets the gates afresh on weights that have them."""
    up1, _, _, up2, _ = sam.mask_decoder.output_upscaling
    for level in PATTERN:
        up1.weight[list(level)] = 0.0
    up1.weight[ZREF, UP_PATTERN : UP_PATTERN + 24] = 0.0  # only its own: the locality reads ZREF too
    for lv in range(3):
        gated = [lv, UP_NEGATIVE[lv]] + (list(UP_PREV) if lv == 2 else [])
        up2.weight[UP_PATTERN + 8 * lv : UP_PATTERN + 8 * lv + 8, gated] = 0.0
        for k, (a2, b2) in enumerate(SUBPIXELS):
            pos = UP_PATTERN + 8 * lv + k
            neg = pos + 4
            for a1, b1 in SUBPIXELS:
                src = PATTERN[lv][(2 * a1 + a2) * 4 + 2 * b1 + b2]
                # minus ZREF (0 before the transformer's norms): the norms shift every channel alike
                for ch, sign in ((src, 1.0), (ZREF, -1.0)):
                    up1.weight[ch, pos, a1, b1] = sign * PATTERN_UP_GAIN
                    up1.weight[ch, neg, a1, b1] = -sign * PATTERN_UP_GAIN
            for out in gated:
                up2.weight[pos, out, a2, b2] = -PATTERN_GATE
                up2.weight[neg, out, a2, b2] = PATTERN_GATE


@torch.no_grad()
def second_marks(sam: Sam) -> None:
    """Mark the pixels of a clicked region that reach into cells centred on another region (see ``SECOND``):
    heads 1..3 of the second image->token attention compare each cell's second codes with the click's, as
    the first layer's heads 0..2 compare its own codes (same sink logits, ``set_match_gains``), and the
    upscaling adds the result where the level's pattern says outside. Changes nothing for an encoder that
    leaves SECOND at 0 and nothing where the patterns are 0; sets the weights afresh on weights that have them."""
    dec = sam.mask_decoder
    g = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    g[:, list(SECOND_FREQUENCY)] = 0.0
    i2t = dec.transformer.layers[1].cross_attn_image_to_token
    # The cell side is after the first layer's norm (a cell's values / its deviation, about SECOND_SIGMA):
    # ZREF cancels the norm's shift, the bias the positional 1, and the sink reads DENSE (10 / deviation),
    # so a code's logit and the sink's scale alike with the cell's deviation.
    gain = CODE_SCALE * SECOND_SIGMA / SECOND_SCALE
    for lv in range(3):
        d = 16 * (1 + lv)
        i2t.q_proj.weight[d : d + 16] = 0.0
        i2t.k_proj.weight[d : d + 16] = 0.0
        i2t.v_proj.weight[d : d + 16] = 0.0
        i2t.out_proj.weight[:, d : d + 16] = 0.0
        for j, ch in enumerate(SECOND[lv][:COMPARED]):
            i2t.q_proj.weight[d + j, ch] = gain
            i2t.q_proj.weight[d + j, ZREF] = -gain
            i2t.q_proj.bias[d + j] = -gain
            i2t.k_proj.weight[d + j, CODE[lv][j]] = CODE_SCALE
        i2t.q_proj.bias[d + 15] = 0.0
        i2t.k_proj.weight[d + 15, SINK] = 1.0
        i2t.v_proj.weight[d, LABEL] = 1.0
        i2t.out_proj.weight[SECOND_MARK[lv], d] = MARK_GAIN / SECOND_SIGMA  # one norm fewer than the first marks
    up1, _, _, up2, _ = dec.output_upscaling
    for lv in range(3):
        src, twin = UP_SECOND_IN[lv], UP_SECOND_IN[lv] + 1
        up1.weight[:, src] = up1.weight[:, twin] = 0.0
        up1.weight[SECOND_MARK[lv], src] = UP_MARK
        up1.weight[SECOND_MARK[lv], twin] = -UP_MARK
        for out, sign in zip(UP_SECOND[lv], (1.0, -1.0)):
            up2.weight[:, out] = 0.0
            up2.weight[src, out] = sign
            up2.weight[twin, out] = -sign
            for k, (a2, b2) in enumerate(SUBPIXELS):
                pos = UP_PATTERN + 8 * lv + k
                up2.weight[pos, out, a2, b2] = SECOND_GATE
                up2.weight[pos + 4, out, a2, b2] = -SECOND_GATE
            up2.bias[out] = -SECOND_OPEN
    for k, mlp in enumerate(dec.output_hypernetworks_mlps):
        out = mlp.layers[-1]
        if k:
            first, twin = UP_SECOND[k - 1]
            if k == 1 and float(out.bias[UP_LOCAL[0]]) != 0.0:  # with the locality, token 1 reads its gated copies
                first, twin = UP_LOCAL[1:]
            out.bias[first] = READ_GAIN * SECOND_READ
            out.bias[twin] = -READ_GAIN * SECOND_READ
    set_match_gains(sam, match_gains(sam))
    if not reads_hidden_units(sam):  # a fitted token 0 keeps the second reads it was fitted with
        _single_second_reads(_single_reader(sam))
    if float(dec.output_hypernetworks_mlps[2].layers[-1].bias[2]) != 0.0:  # token 2 also reads the whole's marks
        part_within_whole(sam)


def _negative_heads(sam: Sam) -> list[int]:
    """The first channel of each negative-mark head that is laid out (``negative_marks``)."""
    k = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token.k_proj.weight.detach()
    return [d for d in (16 * (NEG_HEAD + lv) for lv in range(3)) if float(k[d + 15, SINK]) != 0.0]


def has_negative_marks(sam: Sam) -> bool:
    """Whether ``sam``'s decoder writes the negative clicks' marks (``negative_marks``)."""
    return bool(_negative_heads(sam))


@torch.no_grad()
def negative_marks(sam: Sam) -> None:
    """Write each level's mark of the negative clicks alone into ``NEG_MARK`` and the 2x grid (``UP_NEG``):
    heads 5..7 of the second image->token attention compare a cell's own codes (after the first layer's norm,
    as ``second_marks`` reads its second codes) with the negative clicks' codes against the comparison heads'
    sinks (``set_match_gains``); a positive click's key carries its label, which puts it far below the sink.
    Nothing reads them but token 0's fitted units (``trimask.training.single_fit``), so until a fit every answer
    is what it was; with no negative click they are 0. Sets the weights afresh on weights that have them."""
    i2t = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    gain = CODE_SCALE * SECOND_SIGMA
    for lv in range(3):
        d = 16 * (NEG_HEAD + lv)
        for proj in (i2t.q_proj, i2t.k_proj, i2t.v_proj):
            proj.weight[d : d + 16] = 0.0
            proj.bias[d : d + 16] = 0.0
        i2t.out_proj.weight[:, d : d + 16] = 0.0
        for j, ch in enumerate(CODE[lv][:COMPARED]):
            i2t.q_proj.weight[d + j, ch] = gain
            i2t.q_proj.weight[d + j, ZREF] = -gain
            i2t.k_proj.weight[d + j, ch] = CODE_SCALE
        # The sink's logit (1 + s) x, a negative click's s x (its label, -LABEL_KEY, against the IoU token's type),
        # a positive one's -s x: the negatives are matched as the first layer matches every click.
        i2t.k_proj.weight[d + 15, SINK] = 1.0 + NEG_SUPPRESS
        _read_token(i2t.k_proj, d + 15, LABEL, -NEG_SUPPRESS * IOU_TYPE_KEY / LABEL_KEY)
        _read_token(i2t.v_proj, d, LABEL, -1.0)
        i2t.out_proj.weight[NEG_MARK[lv], d] = NEG_GAIN * MARK_GAIN / SECOND_SIGMA
    set_match_gains(sam, match_gains(sam))
    up1 = sam.mask_decoder.output_upscaling[0]
    for lv in range(3):
        up1.weight[:, [UP_NEG[lv], UP_NEG[lv] + 1]] = 0.0
        for ch, sign in ((NEG_MARK[lv], 1.0), (ZREF, -1.0)):  # minus ZREF: the norms' shift
            up1.weight[ch, UP_NEG[lv]] = sign * UP_MARK
            up1.weight[ch, UP_NEG[lv] + 1] = -sign * UP_MARK


@torch.no_grad()
def subpart_locality(sam: Sam) -> None:
    """Switch the subpart candidate (multimask token 1) off far from every click (see ``LOCAL_COLUMNS``).
    Call after ``pattern_gates`` and ``second_marks``: it copies the subpart's 4x-grid channels they make."""
    g = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    magnitude = 1.52 / (2 * math.pi * LOCAL_RADIUS * 2 / 64)  # sum of the cosines ~ J0, which is half at 1.52
    for k, col in enumerate(LOCAL_COLUMNS):
        g[0, col] = magnitude * math.cos(math.pi * k / 5)
        g[1, col] = magnitude * math.sin(math.pi * k / 5)
    i2t = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    d = 64  # head 4
    for proj in (i2t.q_proj, i2t.k_proj, i2t.v_proj):
        proj.weight[d : d + 16] = 0.0
        proj.bias[d : d + 16] = 0.0
    i2t.out_proj.weight[:, d : d + 16] = 0.0
    # A cell's positional part against a click's (a token carries it only in its initial copy after the
    # first layer), summed over the five columns: 5 x kernel at the click; q . k / 4.
    for j, col in enumerate(LOCAL_COLUMNS):
        for t, ch in enumerate((col, 128 + col)):
            _read_token(i2t.q_proj, d + 2 * j + t, ch, LOCAL_PEAK * 4 / 5)
            _read_token(i2t.k_proj, d + 2 * j + t, ch, 1.0)
    i2t.q_proj.bias[d + 10] = 1.0
    _read_token(i2t.k_proj, d + 10, SINK, 0.5 * LOCAL_PEAK * 4 / IOU_TYPE_KEY)
    _read_token(i2t.v_proj, d, SINK, 1.0)
    i2t.out_proj.weight[FAR, d] = FAR_GAIN / IOU_TYPE_VALUE
    up1, _, _, up2, _ = sam.mask_decoder.output_upscaling
    up1.weight[:, list(UP_FAR)] = 0.0
    for ch, sign in ((FAR, 1.0), (ZREF, -1.0)):  # minus ZREF: the norms' shift
        up1.weight[ch, UP_FAR[0]] = sign * UP_MARK
        up1.weight[ch, UP_FAR[1]] = -sign * UP_MARK
    reader = sam.mask_decoder.output_hypernetworks_mlps[1].layers[-1]
    for plain, local in zip((0, *UP_SECOND[0]), UP_LOCAL):
        up2.weight[:, local] = up2.weight[:, plain]
        up2.bias[local] = up2.bias[plain]
        if float(reader.bias[plain]) != 0.0:
            reader.bias[local] = reader.bias[plain]
            reader.bias[plain] = 0.0
    for local in UP_LOCAL[:2]:
        up2.weight[UP_FAR[0], local] = -LOCAL_GATE
        up2.weight[UP_FAR[1], local] = LOCAL_GATE


@torch.no_grad()
def part_within_whole(sam: Sam) -> None:
    """Keep the part candidate (multimask token 2) within the clicked whole (see ``PART_WHOLE_READ``). Call
    after ``second_marks``: token 2 takes token 3's reads of the whole's marks, scaled; sets them afresh."""
    hyper = sam.mask_decoder.output_hypernetworks_mlps
    part, whole = hyper[2].layers[-1].bias, hyper[3].layers[-1].bias
    for ch in (2, *UP_SECOND[2]):
        part[ch] = PART_WHOLE_READ * whole[ch]
    part[UP_CONSTANT] = -(READ_BIAS + PART_WHOLE_BIAS)


def _box_half_planes(i2t: torch.nn.Module) -> None:
    """Heads 3..6 of the first image->token attention: a cell attends to a corner token when it lies
    inside that corner's half-plane (x > x1, y > y1, x < x2, y < y2); each adds about 1 to ``BOXIN``.

    Logit = BOX_SHARPNESS * (sin(s (t - t_c) - phase) + sin(phase)), with t the cell's and t_c the
    corner's phase along the axis and s = +1 / -1 for the first / second corner: 0 at the corner's
    line, rising inwards. Other tokens score 0 (a point token only its positional part, never the
    sin(phase) gate) and carry no value; with no box the heads add nothing.
    """
    root = math.sqrt(4 * BOX_SHARPNESS)  # q . k / sqrt(16 head channels) = BOX_SHARPNESS * (...)
    cos_p, sin_p = math.cos(BOX_PHASE), math.sin(BOX_PHASE)
    for h, (col, corner, s) in enumerate(((0, 0, 1), (1, 0, 1), (0, 1, -1), (1, 1, -1))):
        d = 16 * (3 + h)
        sin_ch, cos_ch = BOX_COLUMNS[col], 128 + BOX_COLUMNS[col]
        # Cell (a = s t - phase): sin a = s sin t cos p - cos t sin p; cos a = cos t cos p + s sin t sin p.
        i2t.q_proj.weight[d, sin_ch] = root * s * cos_p
        i2t.q_proj.weight[d, cos_ch] = -root * sin_p
        i2t.q_proj.weight[d + 1, cos_ch] = root * cos_p
        i2t.q_proj.weight[d + 1, sin_ch] = root * s * sin_p
        i2t.q_proj.weight[d + 2, DENSE] = root / 10.0
        # Corner (b = s t_c): cos b, -sin b, and the gate.
        _read_token(i2t.k_proj, d, cos_ch, root)
        _read_token(i2t.k_proj, d + 1, sin_ch, -root * s)
        _read_token(i2t.k_proj, d + 2, BOX_TYPES[corner], root * sin_p / TYPE_SIZE)
        _read_token(i2t.v_proj, d, BOX_STATE[corner], 1.0 / CORNER_STATE)
        i2t.out_proj.weight[BOXIN, d] = 1.0


def _box_and_object(i2t: torch.nn.Module) -> None:
    """Head 0 of the second image->token attention: cells inside all four half-planes and on an object
    attend to the first corner and take its value into ``BOXMARK`` (a full mark's size)."""
    root = math.sqrt(4 * BOX_AND_GAIN)
    i2t.q_proj.weight[0, BOXIN] = root
    i2t.q_proj.weight[0, OBJ] = root * BOX_OBJECT_WEIGHT / OBJECT_VALUE
    i2t.q_proj.weight[0, DENSE] = -root * BOX_THRESHOLD / 10.0  # DENSE is 10 before the norms
    _read_token(i2t.k_proj, 0, BOX_TYPES[0], root / TYPE_SIZE)
    _read_token(i2t.v_proj, 0, BOX_STATE[0], 1.0 / CORNER_STATE)
    i2t.out_proj.weight[BOXMARK, 0] = MARK_GAIN * 16


def _mark_areas(final: torch.nn.Module) -> None:
    """Head 7 of the final token->image attention (no query or key: every cell weighs the same) gives
    every token the mean of each mark over the image, i.e. how large each candidate is, in
    ``AREA``: what the IoU head needs to tell an empty or spilled candidate from a good one. The
    hypernetworks read constants only, so the masks do not change."""
    for j, ch in enumerate((*MARK, BOXMARK)):
        final.v_proj.weight[112 + j, ch] = 1.0
        final.out_proj.weight[AREA[j], 112 + j] = AREA_GAIN


@torch.no_grad()
def mark_strengths(sam: Sam) -> None:
    """Heads 0..3 of the final token->image attention give the IoU token, per mark (subpart, part, whole,
    box), the mark's mean and objectness's mean over the cells weighted by e^(4 x the cell's mark): that is,
    mostly over the candidate itself. A candidate whose cells match the click only weakly, or spill off
    objects, shows it here; its area alone (``AREA``) does not. Only the IoU token has a query (its type
    channel), and the hypernetworks read constants only, so the masks do not change.

    Measured after the layout's norms on clicks of generated scenes: a full mark is about 4 (minus the
    cell's ``ZREF``, the norm's shift), the IoU token's type channel about 24.
    """
    final = sam.mask_decoder.transformer.final_attn_token_to_image
    full_mark, iou_type = 4.0, 24.0
    gain = STRENGTH_SHARPNESS * math.sqrt(16) / (full_mark * iou_type)
    for h, ch in enumerate((*MARK, BOXMARK)):
        d = 16 * h
        _read_token(final.q_proj, d, SINK, gain)
        _read_token(final.k_proj, d, ch, 1.0)
        _read_token(final.v_proj, d, ch, 1.0 / full_mark)
        _read_token(final.v_proj, d + 1, OBJ, 1.0 / OBJECT_VALUE)
        final.out_proj.weight[STRENGTH[h], d] = AREA_GAIN
        final.out_proj.weight[STRENGTH_OBJECT[h], d + 1] = AREA_GAIN


def _mask_input(down: torch.nn.Sequential) -> None:
    """The mask input's sign per cell into ``PREV`` (about +-1): each conv takes a 2 x 2 mean as a
    (+, -) pair, which the 4- and 16-channel LayerNorm2d turn into its sign; the constant stays."""
    conv1, norm1, _, conv2, norm2, _, conv3 = down
    _zero(conv1, norm1, conv2, norm2, conv3)
    norm1.weight.fill_(1.0)
    norm2.weight.fill_(1.0)
    conv1.weight[0, 0] = 0.25
    conv1.weight[1, 0] = -0.25
    conv2.weight[0, 0] = conv2.weight[1, 1] = 0.25
    conv2.weight[0, 1] = conv2.weight[1, 0] = -0.25
    conv3.weight[PREV, 0] = 1 / math.sqrt(8)
    conv3.weight[PREV, 1] = -1 / math.sqrt(8)
    conv3.bias[DENSE] = 10.0
