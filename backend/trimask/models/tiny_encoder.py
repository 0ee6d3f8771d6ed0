"""The image encoder of the embedded ``tiny`` model.

Same interface as SAM's ViT encoders: a normalized, zero-padded
``B x 3 x 1024 x 1024`` input becomes a ``B x 256 x 64 x 64`` embedding that
the standard SAM prompt encoder and mask decoder consume. It is small enough
to train on a CPU: it looks at a 256 x 256 downscaled copy of the input
(average pooling by 4), so every feature map is at most 128 x 128.

Layout: a strided conv stem to 64 x 64, depthwise-separable residual blocks at
64 x 64 (local colour/texture boundaries, for subparts and parts) and a small
context branch at 32 and 16 (which pixels belong to the same object, for
wholes), fused back at 64 x 64 and projected to 256 channels with a
LayerNorm2d neck like SAM's.

Optionally (``pattern_offset``) a pattern head adds sub-cell detail: for each cell and each of three
levels, which of the cell's 4 x 4 pixels lie outside the cell's own region, as 48 channels from
``pattern_offset`` (16 per level, rows first; from 0 for a pixel surely inside to 1 for one surely
outside, see ``pattern_cut``), read from a small full-resolution
conv on the 256 px copy and the 64 x 64 features (``trimask.training.decoder_start.PATTERN`` says how
the decoder uses them).

With a pattern head, ``second_offset`` adds each cell's second codes: per level, the code of the neighbouring
cell towards the pixels the pattern calls outside (``neighbour_codes``), i.e. of the region those pixels most
likely belong to, as 48 channels from ``second_offset`` (scaled by ``SECOND_SCALE``). A cell's codes are
those of the region at its centre; with its second codes the decoder can also mark the pixels of a region
that only reaches into the cell (``trimask.training.decoder_start.SECOND``). They are computed, not learned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimask.models.common import LayerNorm2d


def to_work_size(x: torch.Tensor, work_size: int) -> torch.Tensor:
    """The encoder's ``B x 3 x work_size x work_size`` copy of a square input (an area downscale, which
    keeps padded zeros zero); an input already that size is returned as it is."""
    if x.shape[-1] == work_size:
        return x
    return F.avg_pool2d(x, x.shape[-1] // work_size)


class _ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
            nn.GroupNorm(8, cout),
            nn.GELU(),
        )


class _SepResBlock(nn.Module):
    """Depthwise (optionally dilated) 3x3 + pointwise MLP, residual. ``B x C x H x W`` -> same."""

    def __init__(self, channels: int, *, dilation: int = 1, expand: int = 2) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, 1, dilation, dilation=dilation, groups=channels, bias=False)
        self.bn = nn.GroupNorm(8, channels)
        self.pw1 = nn.Conv2d(channels, channels * expand, 1)
        self.pw2 = nn.Conv2d(channels * expand, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.dw(x))
        y = self.pw2(F.gelu(self.pw1(y)))
        return x + y


# The head's logit above which a pixel is written as outside (p > 0.88); below, 0: the cell's mark stays.
# The default, for checkpoints that record none (``pattern_cut`` in their encoder_kwargs): chosen when the
# head was first trained (at 0, held-out subparts gained 0.01 more but wholes lost 0.01 and, on photos,
# the preselected candidate held the click at 57 of 125 grid clicks instead of 64). ``train-tiny
# --calibrate-cut-scenes`` chooses it again for the weights at hand and records it in the checkpoint.
PATTERN_CUT = 2.0


CODE_OFFSET = 16  # where the encoder's region codes start (``trimask.training.decoder_start.CODE``)
# Second codes are written at a quarter of the codes' size, so the decoder's norms scale the rest alike.
SECOND_SCALE = 0.25
SECOND_TURN = 0.25  # a centroid this far (in pixels) off the cell's centre along an axis points to that side
SECOND_MIN = 0.5  # a cell whose pattern sums to less than this (of 16 pixels) gets no second code


def neighbour_codes(codes: torch.Tensor, outside: torch.Tensor, *, levels: int = 3) -> torch.Tensor:
    """``codes`` and ``outside`` ``B x 16 levels x H x W`` (per level a 16-d code; 16 pixel values, rows
    first, 0 inside to 1 outside) -> ``B x 16 levels x H x W``: per cell and level, the code of the neighbour
    (of 8, or none) in the direction of the centroid of its outside pixels; 0 where too little is outside
    or the neighbour lies off the grid."""
    b, _, h, w = codes.shape
    k = torch.arange(16, dtype=codes.dtype, device=codes.device)
    ys, xs = (k // 4 - 1.5).view(1, 16, 1, 1), (k % 4 - 1.5).view(1, 16, 1, 1)
    padded = F.pad(codes, (1, 1, 1, 1))
    shifted = torch.stack([padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dim=1)  # B x 9 x C x H x W
    out = []
    for lv in range(levels):
        p = outside[:, 16 * lv : 16 * (lv + 1)]
        n = p.sum(1, keepdim=True)
        cy, cx = ((p * axis).sum(1, keepdim=True) / n.clamp(min=1e-6) for axis in (ys, xs))
        sy = (cy > SECOND_TURN).long() - (cy < -SECOND_TURN).long()
        sx = (cx > SECOND_TURN).long() - (cx < -SECOND_TURN).long()
        side = (sy + 1) * 3 + (sx + 1)  # B x 1 x H x W; 4 is the cell itself
        level = shifted[:, :, 16 * lv : 16 * (lv + 1)]
        pick = torch.gather(level, 1, side[:, None].expand(b, 1, 16, h, w))[:, 0]
        out.append(pick * ((n >= SECOND_MIN) & (side != 4)).to(codes.dtype))
    return torch.cat(out, dim=1)


def with_patterns(out: torch.Tensor, pattern: torch.Tensor, pattern_offset: int,
                  second_offset: int | None = None) -> torch.Tensor:
    """An embedding with ``pattern`` (``B x 48 x 64 x 64``, 0 inside to 1 outside) added to its 48 channels
    from ``pattern_offset`` and, with ``second_offset``, the second codes those patterns give written to the 48
    from there (``neighbour_codes`` of the embedding's codes, at ``SECOND_SCALE``), as the encoder writes them."""
    o = pattern_offset
    out = torch.cat([out[:, :o], out[:, o : o + 48] + pattern, out[:, o + 48 :]], dim=1)
    if second_offset is None:
        return out
    s, c = second_offset, CODE_OFFSET
    second = SECOND_SCALE * neighbour_codes(out[:, c : c + 48], pattern)
    return torch.cat([out[:, :s], second, out[:, s + 48 :]], dim=1)


class PatternHead(nn.Module):
    """``B x 3 x 256 x 256`` work copy and ``B x C x 64 x 64`` features -> ``B x 16 levels x 64 x 64`` logits."""

    def __init__(self, trunk_width: int, *, levels: int = 3, pixel_width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.pixels = nn.Sequential(
            nn.Conv2d(3, pixel_width, 3, padding=1), nn.GELU(),
            nn.Conv2d(pixel_width, pixel_width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(pixel_width, pixel_width, 3, padding=4, dilation=4), nn.GELU(),
        )
        self.mix = nn.Sequential(
            nn.Conv2d(pixel_width * 16 + trunk_width, hidden, 1), nn.GELU(), nn.Conv2d(hidden, levels * 16, 1),
        )

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([F.pixel_unshuffle(self.pixels(x), 4), features], dim=1))


class TinyImageEncoder(nn.Module):
    """Small conv encoder: ``B x 3 x 1024 x 1024`` -> ``B x out_chans x 64 x 64``."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        work_size: int = 256,
        width: int = 96,
        context_width: int = 128,
        depth: int = 4,
        out_chans: int = 256,
        pattern_offset: int | None = None,
        second_offset: int | None = None,
        pattern_cut: float = PATTERN_CUT,
    ) -> None:
        super().__init__()
        if img_size % work_size or work_size % 4:
            raise ValueError("work_size must divide img_size and be a multiple of 4")
        if pattern_offset is not None and (work_size != 256 or not 0 <= pattern_offset <= out_chans - 48):
            raise ValueError("the pattern head needs work_size 256 (4 x 4 pixels a cell) and 48 channels from pattern_offset")
        if second_offset is not None and (pattern_offset is None or not 0 <= second_offset <= out_chans - 48):
            raise ValueError("second codes need the pattern head and 48 channels from second_offset")
        self.pattern_offset = pattern_offset
        self.second_offset = second_offset
        self.pattern_cut = float(pattern_cut)
        self.img_size = img_size
        self.work_size = work_size
        self.stem = nn.Sequential(
            _ConvBNAct(3, 32, stride=2),  # work/2
            _ConvBNAct(32, 32),
            _ConvBNAct(32, width, stride=2),  # work/4 = 64 for the defaults
        )
        self.local_blocks = nn.Sequential(
            *[_SepResBlock(width, dilation=d) for d in (1, 2, 1, 3)[:depth]]
        )
        # Context: two more halvings, a few blocks, then back up.
        self.down1 = _ConvBNAct(width, context_width, stride=2)
        self.down2 = _ConvBNAct(context_width, context_width, stride=2)
        self.context_blocks = nn.Sequential(
            _SepResBlock(context_width, dilation=1),
            _SepResBlock(context_width, dilation=2),
            _SepResBlock(context_width, dilation=4),
        )
        self.mid_blocks = nn.Sequential(_SepResBlock(context_width, dilation=2))
        self.fuse = nn.Conv2d(width + context_width, out_chans, 1, bias=False)
        # SAM's neck is LN, 3x3 conv, LN; a depthwise 3x3 + pointwise pair keeps its shape
        # at a tenth of the cost (a dense 256->256 3x3 at 64 x 64 would dominate the encoder).
        self.neck = nn.Sequential(
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, groups=out_chans, bias=False),
            nn.Conv2d(out_chans, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.pattern = PatternHead(width) if pattern_offset is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``B x 3 x img_size x img_size`` normalized and zero-padded -> ``B x 256 x 64 x 64``."""
        return self.forward_work(to_work_size(x, self.work_size))

    def forward_work(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``B x 3 x work_size x work_size`` (already downscaled) -> ``B x 256 x 64 x 64``."""
        f64 = self.trunk(x)
        c32 = self.down1(f64)
        c16 = self.context_blocks(self.down2(c32))
        c32 = self.mid_blocks(c32 + F.interpolate(c16, size=c32.shape[-2:], mode="bilinear", align_corners=False))
        ctx = F.interpolate(c32, size=f64.shape[-2:], mode="bilinear", align_corners=False)
        out = self.neck(self.fuse(torch.cat([f64, ctx], dim=1)))
        if self.pattern is None:
            return out
        pattern = torch.tanh(0.5 * (self.pattern(x, f64) - self.pattern_cut)).clamp(min=0.0)
        return with_patterns(out, pattern, self.pattern_offset, self.second_offset)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The 64 x 64 local features of a work-size input (what the pattern head reads beside the pixels)."""
        return self.local_blocks(self.stem(x))
