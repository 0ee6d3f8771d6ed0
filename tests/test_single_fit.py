"""Fitting token 0's answers with SAM's mask loss (``trimask.training.single_fit``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trimask.training.decoder_start import (UP1_CONSTANT, UP_BOX, UP_FAR, UP_HIDDEN, clear_hidden_units,
                                            reads_hidden_units, second_marks, single_read)
from trimask.training.evaluate import _iou, click_answers, clicked_scenes, first_answers
from trimask.training.read_calibration import calibrate_reads
from trimask.training.single_fit import BOX_GATE, BOX_GATE_ZERO, CLICKS, _logits, _up2, collect, fit_single
from trimask.training.trainer import decode, to_frame

from test_read_calibration import SCENES, _model

STUBBORN = {"subpart": 0.5, "part": 0.5, "whole": 0.5, "box": 2.0, "prev": 4.0, "bias": 1.0}


def _protocol_ious(sam) -> list[float]:
    """Token 0's answers to clicks 2..5 of the standard protocol on SCENES, every level the target."""
    out = []
    for inst, hw, emb in clicked_scenes(sam, SCENES, np.random.default_rng(0)):
        targets = [lv for i in inst for lv in i]
        masks = click_answers(sam, emb, hw, targets, first_answers(sam, emb, hw, targets))
        out += [_iou(m, t) for step in masks[1:] for m, t in zip(step, targets)]
    return out


@torch.no_grad()
def test_collected_inputs_give_the_decoders_answers():
    # What the fit trains on must be what the decoder computes: token 0's logits recomputed from the
    # kept 2x-grid channels (hidden units included) equal the decoded ones.
    sam = _model()
    gen = torch.Generator().manual_seed(1)
    _up2(sam).weight[:, list(UP_HIDDEN)] = torch.randn(64, len(UP_HIDDEN), 2, 2, generator=gen) * 0.3
    sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias[list(UP_HIDDEN)] = torch.randn(len(UP_HIDDEN), generator=gen)
    data = collect(sam, SCENES[:1])
    assert len(data) == 1
    u, targets = data[0]
    assert u.shape == (len(targets), 64, 128, 128) and u.dtype == torch.float16
    assert targets.shape == (len(targets), 256, 256) and targets.dtype == torch.bool
    # The second click's answers, decoded directly for the same instances.
    inst, hw, emb = next(clicked_scenes(sam, SCENES[:1], np.random.default_rng(0)))
    levels = [lv for i in inst for lv in i]
    n = len(levels)
    assert len(targets) == (CLICKS - 1) * n
    decoded = []
    keep = lambda click, pt, lb, prev: decoded.append(decode(sam, emb, pt, lb, None, prev, False)[0]) or decoded[-1]  # noqa: E731
    click_answers(sam, emb, hw, levels, first_answers(sam, emb, hw, levels), clicks=2, answer=keep)
    up2, reader = _up2(sam), sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias
    recomputed = _logits(u[:n], up2.weight, up2.bias, reader)
    assert torch.allclose(recomputed, decoded[0][:, 0], atol=0.05 * float(decoded[0].abs().max()))
    assert float(((recomputed > 0) == (decoded[0][:, 0] > 0)).float().mean()) > 0.999
    assert reads_hidden_units(sam)


def test_fit_repairs_a_stubborn_token0_and_changes_nothing_else():
    # Token 0 that holds on to the previous answer (prev 4) and barely reads the clicks: the fit must
    # lower the held-out loss, answer the protocol's clicks better when they are decoded, and change only
    # the hidden units and token 0's reads (the three candidates of a click stay as they were).
    sam = _model(STUBBORN)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    start = _protocol_ious(sam)
    data = collect(sam, SCENES)
    result = fit_single(sam, data, steps=150, batch=4, lr=3e-2)
    assert result["held_out_loss"][1] < result["held_out_loss"][0] and result["step"] > 0
    assert result["answers"] == sum(len(d[0]) for d in data)
    changed = {k for k, v in sam.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"mask_decoder.output_upscaling.3.weight", "mask_decoder.output_hypernetworks_mlps.0.layers.2.bias"}
    assert not _up2(sam).bias[list(UP_HIDDEN)].any()  # no bias: no clicks and no mask input, no unit
    w = sam.state_dict()["mask_decoder.output_upscaling.3.weight"]
    others = [c for c in range(32) if c not in UP_HIDDEN]
    assert torch.equal(w[:, others], before["mask_decoder.output_upscaling.3.weight"][:, others])
    # The units read the distance from the clicks (the locality's FAR) as a signed pair, like the marks.
    hidden = list(UP_HIDDEN)
    assert w[UP_FAR[0], hidden].abs().sum() > 0
    assert torch.equal(w[UP_FAR[1], hidden], -w[UP_FAR[0], hidden])
    assert reads_hidden_units(sam)
    got = _protocol_ious(sam)
    assert np.mean(got) > np.mean(start) + 0.05
    # The box's gate: every unit reads the box mark at -BOX_GATE and the constant channel against it, fixed.
    assert torch.all(w[UP_BOX, hidden] == -BOX_GATE)
    assert torch.allclose(w[UP1_CONSTANT, hidden], torch.tensor(BOX_GATE * BOX_GATE_ZERO))
    # A box alone reaches the units only through the distance from the clicks (no clicks, no mask input) and
    # the gate closes them inside the box, while the clicks of the protocol open them; the box's reads are
    # kept: answered as before here (up to the other reads times the small values the norms leave in the
    # empty marks' channels).
    seen: list[torch.Tensor] = []

    def _units(u: torch.Tensor) -> torch.Tensor:  # the hidden units' outputs on the 2x grid's channels u
        return F.gelu(F.conv_transpose2d(u, w[:, hidden], stride=2))

    hook = _up2(sam).register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    sam_before = _model(STUBBORN)
    try:
        for scene in SCENES:
            inst, hw, emb = next(clicked_scenes(sam, [scene], np.random.default_rng(0)))
            box = torch.tensor(np.stack([to_frame(np.array([[x.min(), y.min()], [x.max(), y.max()]], float), hw).reshape(4)
                                         for y, x in (np.nonzero(t) for i in inst for t in i)]), dtype=torch.float32)
            seen.clear()
            with torch.no_grad():
                after = decode(sam, emb, None, None, box, None, False)[0] > 0
                units = _units(seen[0])
                inside = F.interpolate((seen[0][:, UP_BOX : UP_BOX + 1] > 1).float(), scale_factor=2) > 0
                assert inside.any() and float(units.abs().amax(1, keepdim=True)[inside].max()) < 0.05
                seen.clear()
                targets = [lv for i in inst for lv in i]
                click_answers(sam, emb, hw, targets, first_answers(sam, emb, hw, targets), clicks=2)
                assert float(_units(seen[-1]).abs().max()) > 0.1
                before_ = decode(sam_before, emb, None, None, box, None, False)[0] > 0
            assert before_.any() and float((after == before_).float().mean()) > 0.995
    finally:
        hook.remove()
    # Laying the second codes out again keeps the fitted reads; clearing the units restores the rule.
    fitted = {k: v.clone() for k, v in sam.state_dict().items()}
    second_marks(sam)
    assert all(torch.equal(v, fitted[k]) for k, v in sam.state_dict().items())
    clear_hidden_units(sam)
    assert not reads_hidden_units(sam)
    assert not _up2(sam).weight[:, list(UP_HIDDEN)].any()


def test_the_reads_search_starts_from_the_linear_rule():
    sam = _model(STUBBORN)
    fit_single(sam, collect(sam, SCENES), steps=5, batch=4)
    assert reads_hidden_units(sam)
    calibrate_reads(sam, SCENES, grid=(3.0,))
    assert not reads_hidden_units(sam) and single_read(sam)["bias"] == pytest.approx(1.0, abs=1e-4)


def test_too_few_scenes_are_an_error():
    sam = _model()
    with pytest.raises(ValueError, match="at least two scenes"):
        fit_single(sam, collect(sam, SCENES[:1]))
