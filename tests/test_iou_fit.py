"""Fitting the IoU head on a frozen model's own answers (``trimask.training.iou_fit``)."""
from __future__ import annotations

import copy

import pytest
import torch

from trimask.models.build import build_sam
from trimask.training.iou_fit import collect_answers, fit_iou_head
from trimask.training.scenes import generate_scene


def _fresh_head(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    head = copy.deepcopy(build_sam("tiny", random_init=True).mask_decoder.iou_prediction_head)
    for m in head.modules():
        if hasattr(m, "reset_parameters") and m is not head:
            m.reset_parameters()
    return head


def _synthetic_answers(n: int = 1200, seed: int = 0) -> dict[str, torch.Tensor]:
    """States whose outputs' IoUs are a fixed smooth function of them; two in three rows are clicks."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(n, 256, generator=gen)
    proj = torch.zeros(256, 4)
    proj[:8] = torch.randn(8, 4, generator=gen) / 2  # as a real state's few informative channels
    targets = torch.sigmoid(states @ proj * 3)
    valid = torch.zeros(n, 4, dtype=torch.bool)
    click = torch.rand(n, generator=gen) < 2 / 3
    valid[click, 1:] = True
    valid[~click, 0] = True
    return {"states": states, "targets": targets * valid, "valid": valid, "scenes": n // 4}


def test_fitting_lowers_the_held_out_error_and_ranks_the_candidates():
    head = _fresh_head()
    summary = fit_iou_head(head, _synthetic_answers(), steps=1500)
    assert summary["held_out"] == 240
    assert summary["mse_after"] < summary["mse_before"] / 3
    assert summary["step_chosen"] > 0
    # A random head ranks at about chance; the fitted one closes most of the gap to the best ranking.
    before, after = summary["ranked_first_before"], summary["ranked_first_after"]
    assert after > before + 0.5 * (summary["ranked_first_best_possible"] - before)


def test_a_fit_that_only_gets_worse_keeps_the_starting_head():
    head = _fresh_head()
    answers = _synthetic_answers()
    fit_iou_head(head, answers, steps=1500)
    fitted = copy.deepcopy(head.state_dict())
    # A huge rate makes every check worse than the start.
    summary = fit_iou_head(head, answers, steps=300, lr=50.0)
    assert summary["step_chosen"] == 0
    assert summary["mse_after"] == pytest.approx(summary["mse_before"])
    assert all(torch.equal(fitted[k], v) for k, v in head.state_dict().items())


def test_too_few_answers_to_hold_out_is_an_error():
    answers = {k: v[:1] if torch.is_tensor(v) else v for k, v in _synthetic_answers().items()}
    with pytest.raises(ValueError, match="too few"):
        fit_iou_head(_fresh_head(), answers)


def test_collected_answers_are_the_models_own_on_every_prompt_type():
    sam = build_sam("tiny")
    before = copy.deepcopy(sam.state_dict())
    scenes = [generate_scene(9_000_000 + i, varied_aspect=True) for i in range(3)]
    answers = collect_answers(sam, scenes, seed=1, prompts_per_scene=6)
    again = collect_answers(sam, scenes, seed=1, prompts_per_scene=6)
    assert answers["scenes"] == 3
    states, targets, valid = answers["states"], answers["targets"], answers["valid"]
    assert states.shape == (len(targets), 256) and valid.shape == targets.shape == (len(targets), 4)
    clicks = valid[:, 1:].all(1) & ~valid[:, 0]
    single = valid[:, 0] & ~valid[:, 1:].any(1)
    assert bool((clicks | single).all()) and clicks.sum() >= 3 and single.sum() > clicks.sum()  # corrections + boxes
    assert float(targets.min()) >= 0.0 and float(targets.max()) <= 1.0
    assert float(targets[clicks][:, 1:].max()) > 0.3  # the bundled model's candidates fit some level
    assert torch.equal(targets[~valid], torch.zeros(int((~valid).sum())))
    # Deterministic for a seed; the hook is gone and the model unchanged.
    assert torch.equal(answers["states"], again["states"]) and torch.equal(targets, again["targets"])
    assert not sam.mask_decoder.iou_prediction_head._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())


def test_collecting_stops_at_the_time_limit():
    sam = build_sam("tiny")
    scenes = (generate_scene(9_000_000 + i) for i in range(1000))
    answers = collect_answers(sam, scenes, max_seconds=0.5)
    assert 1 <= answers["scenes"] < 30
