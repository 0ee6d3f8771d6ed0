"""SAM's mask loss on the tiny encoder's code path (``trimask.training.code_path``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training import losses
from trimask.training.code_path import CodePathConfig, scene_loss
from trimask.training.evaluate import center_point, click_instances
from trimask.training.scenes import generate_scene
from trimask.training.trainer import decode, low_res_target, to_frame


@pytest.fixture(scope="module")
def bundled():
    sam = build_sam("tiny")
    scene = next(s for s in (generate_scene(3_000_000 + i) for i in range(20)) if click_instances(s, 2, np.random.default_rng(0)))
    with torch.no_grad():
        return sam, scene, sam.image_encoder(preprocess(scene.image))


def _first_click_only(weights, scale: float = 1.0) -> CodePathConfig:
    return CodePathConfig(center_prob=1.0, level_weights=weights, box_weight=0.0, click_weight=0.0, code_weight=0.0,
                          logit_scale=scale)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_each_first_click_candidate_is_trained_on_its_own_level(bundled, scale: float):
    sam, scene, emb = bundled
    # The candidates recomputed by hand: the clicks at the centres of the subparts eval would pick.
    inst = click_instances(scene, 4, np.random.default_rng(5))
    hw = scene.image.shape[:2]
    pts = torch.tensor(np.stack([to_frame(np.array([center_point(s)]), hw) for s, _, _ in inst]), dtype=torch.float32)
    with torch.no_grad():
        logits, _ = decode(sam, emb, pts, torch.ones(len(inst), 1), None, None, True)
        for k in range(3):
            weights = [0.0, 0.0, 0.0]
            weights[k] = 1.0
            loss, _ = scene_loss(sam, emb, scene, np.random.default_rng(5), _first_click_only(tuple(weights), scale))
            target = torch.from_numpy(np.stack([low_res_target(levels[k]) for levels in inst])).float()
            with losses.focal_weight(1.0):
                expected = losses.mask_loss(scale * logits[:, k], target).mean()
            # The weighted mean runs over every (instance, candidate) pair, hence the 3.
            assert float(loss) * 3 == pytest.approx(float(expected), rel=1e-5)
        # The weights scale each level's term: (3, 1, 1) is three of the first plus the others.
        parts = [float(scene_loss(sam, emb, scene, np.random.default_rng(5), _first_click_only(w, scale))[0])
                 for w in ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0), (3.0, 1.0, 1.0))]
    assert parts[2] == pytest.approx(3 * parts[0] + parts[1], rel=1e-5)
    # The levels differ, so a mismatch of candidate and level could not pass the checks above.
    assert len({round(p, 4) for p in parts}) == 3


def test_box_second_click_and_codes_add_their_losses(bundled):
    sam, scene, emb = bundled
    with torch.no_grad():
        loss, stats = scene_loss(sam, emb, scene, np.random.default_rng(1), CodePathConfig(level_weights=(2.0, 1.0, 1.0)))
    first = (2 * stats["first_subpart"] + stats["first_part"] + stats["first_whole"]) / 3
    assert float(loss) == pytest.approx(first + stats["box"] + stats["second_click"] + stats["code"], rel=1e-5)
    assert all(v > 0 for v in stats.values())


def test_corrective_rounds_follow_the_protocol_and_share_the_click_weight(bundled):
    sam, scene, emb = bundled
    with torch.no_grad():
        one = scene_loss(sam, emb, scene, np.random.default_rng(1), CodePathConfig(click_rounds=1))[1]
        loss, three = scene_loss(sam, emb, scene, np.random.default_rng(1), CodePathConfig(click_rounds=3))
        none = scene_loss(sam, emb, scene, np.random.default_rng(1), CodePathConfig(click_rounds=0))[1]
    # The rounds draw nothing at random: the first click, the box, the second click and the codes are as with one.
    for key in ("first_subpart", "first_part", "first_whole", "box", "second_click", "code"):
        assert three[key] == pytest.approx(one[key], rel=1e-5)
    assert set(three) - set(one) == {"click_3", "click_4"} and "second_click" not in none
    # Each next click answers differently (it adds a click and feeds the previous answer back).
    assert len({round(three[k], 5) for k in ("second_click", "click_3", "click_4")}) == 3
    first = (three["first_subpart"] + three["first_part"] + three["first_whole"]) / 3
    clicks = (three["second_click"] + three["click_3"] + three["click_4"]) / 3
    assert float(loss) == pytest.approx(first + three["box"] + clicks + three["code"], rel=1e-5)


def test_a_scene_without_a_subpart_to_click_gives_no_loss(bundled):
    sam, _, emb = bundled
    empty = next(s for s in (generate_scene(3_000_000 + i) for i in range(200))
                 if not click_instances(s, 4, np.random.default_rng(0)))
    assert scene_loss(sam, emb, empty, np.random.default_rng(0), CodePathConfig()) is None


def test_sharpened_logits_make_the_subparts_loss_follow_their_masks(bundled):
    """The layout's soft logits leave a small region's soft dice near 1 (about its IoU's complement once sharpened)."""
    sam, scene, emb = bundled
    with torch.no_grad():
        soft = scene_loss(sam, emb, scene, np.random.default_rng(5), _first_click_only((1.0, 0.0, 0.0)))[1]
        sharp = scene_loss(sam, emb, scene, np.random.default_rng(5), _first_click_only((1.0, 0.0, 0.0), 4.0))[1]
    assert soft["first_subpart"] > 0.8 and sharp["first_subpart"] < 0.5
