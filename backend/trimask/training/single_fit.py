"""Token 0's answers fitted with SAM's mask loss: hidden units in the last upscaling (stage 3c).

Token 0, the single-mask output, answers every corrective click and every box. In the code-match
layout its logit is a weighted sum of the 4x grid's channels (the previous answer, the clicks' marks,
the box mark), a linear rule: a positive click adds at most what its weights allow against the
previous answer, and a negative one removes the same amount whatever the positive clicks say. Fitting
a small per-pixel network on the same channels to the right answers measured what a nonlinear rule
gains (the model card has the numbers), so this stage gives token 0 one.

The decoder's last upscaling (a 2 x 2 transposed convolution from the 64 channels of the 2x grid to
the 32 of the 4x grid, then a GELU) leaves channels ``UP_HIDDEN`` unused. The stage sets them to hidden
units, the GELU of a linear form (per sub-pixel position, no bias) in the 2x grid's signed pairs of the
clicks' marks, the previous answer, the second marks and how far each pixel is from every click
(``SIGNED_PAIRS``; the distance is the subpart locality's ``FAR``, so a unit can weigh a mark by it as
multimask token 1's subpart does; where the layout has them, also the negative clicks' own marks,
``NEGATIVE_PAIRS``), and fits their weights
together with what token 0 reads of the 32 channels (all but ``KEPT_READS``), with SAM's mask loss
(dice + ``FOCAL`` x focal) on token 0's own answers:

- clicks 2 to 5 of the standard protocol of ``trimask eval`` on training scenes (a first click at the
  centre of each level's mask answered by the candidate the IoU head ranks first, then clicks at the
  centre of the largest error region, each with the previous logits as the mask input), every level of
  every clicked instance the target;
- the answers' inputs ``u`` are kept (fp16) and the fit runs on them for many passes: everything
  before the last upscaling is fixed for a prompt, and the trajectories are the ones the current reads
  make (one round; further rounds on a fitted rule's own trajectories gained nothing in a trial);
- a held-out fifth of the scenes chooses the step with the lowest loss.

A box alone (no clicks, no mask input) gives every unit an input of about 0 but for the distance (no
click is near: ``FAR_GAIN``), which the units' answer for "far from every click" would read as a reason
to pull the answer in (without a gate, the bundled tiny's boxes around parts and wholes were about 0.015
IoU lower). So every unit also reads the box's mark through a fixed gate (``BOX_GATE``) that closes it
inside a box, and the box's and the constant's reads are kept: a box alone is answered as by the rule
before the fit (up to the other reads, fitted, times the ~0.05 the norms leave in empty channels), and
clicks after a box get no units inside it. Box answers among the fit's data did not do this: with
their targets, or with the rule's own answers as the targets, tight boxes came out smaller (the model
card). The multimask tokens read none of ``UP_HIDDEN``, so the first click's three candidates do not change.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from trimask.models.sam import Sam
from trimask.training.decoder_start import (UP1_CONSTANT, UP_BOX, UP_CONSTANT, UP_FAR, UP_HIDDEN, UP_NEG, UP_NEGATIVE,
                                            UP_PREV, UP_SECOND_IN, _single_reader as _reader, has_negative_marks)
from trimask.training.evaluate import click_answers, clicked_scenes, first_answers
from trimask.training.losses import focal_weight, mask_iou, mask_loss
from trimask.training.scenes import Scene
from trimask.training.trainer import low_res_target

CLICKS = 5
FOCAL = 1.0  # the focal term's weight against dice in this fit (SAM's 20 emptied uncertain answers: see the card)
HIDDEN_INIT = 0.1  # std of the hidden units' first weights (their reads start at 0: the rule starts as it was)
# The hidden units read the 2x grid's signed pairs (x, -x) of the clicks' marks, the previous answer, the
# second marks and the distance from the clicks (FAR), each pair as its difference x, with no bias: without
# clicks or a mask input (a box alone) every input is about 0 (the norms leave ~0.05) but the distance's;
# the box's gate (below) closes the units inside a box, and the box's and the constant's reads are kept.
SIGNED_PAIRS = (*zip(range(3), UP_NEGATIVE), UP_PREV, *((c, c + 1) for c in UP_SECOND_IN), UP_FAR)
KEPT_READS = (UP_BOX, UP_CONSTANT)
# With the negative clicks' own marks laid out (``decoder_start.negative_marks``) the units read them too: a cell
# matched by a positive and a negative click (mark about 0, negative mark high) is then told from one matched by none.
NEGATIVE_PAIRS = tuple((c, c + 1) for c in UP_NEG)

# The box's gate, fixed: every unit also reads the 2x grid's box mark (channel UP_BOX: about 1.9 inside a box,
# -0.083 where there is none, measured on the bundled tiny) at -BOX_GATE, which closes it inside a box
# (GELU(-3.3) ~ 0), and the constant channel (about 7.8) at BOX_GATE x BOX_GATE_ZERO, which cancels the
# gate where there is no box (-0.083 / 7.8), so a box alone is answered by the kept reads.
BOX_GATE = 2.0
BOX_GATE_ZERO = -0.0106


def signed_pairs(sam: Sam) -> tuple[tuple[int, int], ...]:
    """The 2x grid's signed pairs that the hidden units read in ``sam``'s layout."""
    return SIGNED_PAIRS + (NEGATIVE_PAIRS if has_negative_marks(sam) else ())


def _up2(sam: Sam) -> torch.nn.ConvTranspose2d:
    return sam.mask_decoder.output_upscaling[3]


@torch.no_grad()
def collect(sam: Sam, scenes: Iterable[Scene], *, seed: int = 0,
            progress: Callable[[int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token 0's answers to clicks 2..CLICKS of the standard protocol on ``scenes``, per scene: (the 2x
    grid's channels ``u`` that the last upscaling read, ``M x 64 x 128 x 128`` fp16; the targets on the
    low-res grid, ``M x 256 x 256`` bool), click by click, each click's answers in the order of the targets."""
    sam.eval()
    rng = np.random.default_rng(seed)
    got: list[torch.Tensor] = []
    hook = _up2(sam).register_forward_pre_hook(lambda m, i: got.append(i[0].detach().to(torch.float16).cpu()))
    out = []
    try:
        for inst, hw, emb in clicked_scenes(sam, scenes, rng):
            targets = [levels[lv] for levels in inst for lv in range(3)]
            low = torch.from_numpy(np.stack([low_res_target(t) for t in targets]))
            first = first_answers(sam, emb, hw, targets)
            got.clear()
            click_answers(sam, emb, hw, targets, first, CLICKS)  # decodes clicks 2..CLICKS (the first is ``first``)
            out.append((torch.cat(got), low.repeat(len(got), 1, 1)))
            if progress:
                progress(1)
    finally:
        hook.remove()
    return out


def _logits(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reader: torch.Tensor) -> torch.Tensor:
    """Token 0's logits (``N x 256 x 256``) from the 2x grid's channels, as the decoder computes them."""
    up = F.gelu(F.conv_transpose2d(u.float(), weight, bias, stride=2))
    return torch.einsum("c,nchw->nhw", reader, up)


def fit_single(sam: Sam, data: list[tuple[torch.Tensor, torch.Tensor]], *, steps: int = 2000, batch: int = 8,
               lr: float = 3e-3, focal: float = FOCAL, seed: int = 0, max_seconds: float | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Fit the hidden units ``UP_HIDDEN`` of the last upscaling and token 0's reads (all but ``KEPT_READS``)
    to ``data`` (``collect``'s) with SAM's mask loss (the focal term weighted ``focal``); set them in
    ``sam`` at the step with the lowest loss on a held-out fifth of the scenes (the start is a candidate).
    Returns the held-out loss and mean IoU of token 0's answers before and after, the step chosen, the
    steps run and the number of answers."""
    if len(data) < 2:
        raise ValueError("need at least two scenes with a subpart to click (one is held out)")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen).tolist()
    n_held = max(1, len(data) // 5)
    held = [data[i] for i in order[:n_held]]
    train_u = torch.cat([data[i][0] for i in order[n_held:]])
    train_t = torch.cat([data[i][1] for i in order[n_held:]])
    up2, reader = _up2(sam), _reader(sam)
    hidden = list(UP_HIDDEN)
    base_w, base_b = up2.weight.detach().clone(), up2.bias.detach().clone()
    base_b[hidden] = 0.0
    pairs = signed_pairs(sam)
    w_p = torch.randn(len(SIGNED_PAIRS), len(hidden), 2, 2, generator=gen) * HIDDEN_INIT
    if len(pairs) > len(SIGNED_PAIRS):  # drawn after the others, so those start as without them
        w_p = torch.cat([w_p, torch.randn(len(pairs) - len(SIGNED_PAIRS), len(hidden), 2, 2, generator=gen) * HIDDEN_INIT])
    w_p.requires_grad_()
    r = reader.detach().clone()
    r[hidden] = 0.0
    r.requires_grad_()
    kept = reader.detach()[list(KEPT_READS)].clone()

    def weights() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = base_w.clone()
        w[:, hidden] = 0.0
        w[UP_BOX, hidden] = -BOX_GATE
        w[UP1_CONSTANT, hidden] = BOX_GATE * BOX_GATE_ZERO
        for k, (pos, neg) in enumerate(pairs):
            w[pos, hidden] = w_p[k]
            w[neg, hidden] = -w_p[k]
        rd = r.clone()
        rd[list(KEPT_READS)] = kept
        return w, base_b, rd

    @torch.no_grad()
    def held_out(w: torch.Tensor, b: torch.Tensor, rd: torch.Tensor) -> tuple[float, float]:
        losses, ious = [], []
        with focal_weight(focal):
            for u, t in held:
                for k in range(0, len(u), batch):
                    lg = _logits(u[k : k + batch], w, b, rd)
                    losses.append(mask_loss(lg, t[k : k + batch]))
                    ious.append(mask_iou(lg, t[k : k + batch]))
        return float(torch.cat(losses).mean()), float(torch.cat(ious).mean())

    start = held_out(up2.weight.detach(), up2.bias.detach(), reader.detach())
    best = (start[0], 0, up2.weight.detach().clone(), up2.bias.detach().clone(), reader.detach().clone())
    opt = torch.optim.Adam([w_p, r], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0, step = time.monotonic(), 0
    check = max(1, steps // 20)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train_u), (batch,), generator=gen)
        with focal_weight(focal):
            loss = mask_loss(_logits(train_u[idx], *weights()), train_t[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % check == 0 or step == steps:
            w, b, rd = (x.detach() for x in weights())
            got = held_out(w, b, rd)
            if got[0] < best[0]:
                best = (got[0], step, w.clone(), b.clone(), rd.clone())
        if progress:
            progress(1)
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            break
    with torch.no_grad():
        up2.weight.copy_(best[2])
        up2.bias.copy_(best[3])
        reader.copy_(best[4])
    end = held_out(up2.weight.detach(), up2.bias.detach(), reader.detach())
    return {"held_out_loss": [round(start[0], 4), round(end[0], 4)], "held_out_iou": [round(start[1], 4), round(end[1], 4)],
            "step": best[1], "steps": step, "answers": int(len(train_u) + sum(len(d[0]) for d in held)),
            "focal": focal}
