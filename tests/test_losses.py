"""SAM's training objectives against hand-computed values, and where their gradients go."""
import math

import torch

from trimask.training import losses


def test_focal_loss_matches_hand_computed_value_at_even_odds():
    logits = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    # p = 0.5 everywhere: ce = ln 2, (1 - p_t)^2 = 0.25; alpha 0.25 for the positive, 0.75 for the negative.
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)) / 2
    assert torch.allclose(losses.focal_loss(logits, target), torch.tensor([expected]), atol=1e-6)


def test_focal_loss_down_weights_confident_correct_pixels():
    target = torch.ones(1, 1, 1)
    easy = losses.focal_loss(torch.full((1, 1, 1), 4.0), target)
    hard = losses.focal_loss(torch.full((1, 1, 1), -4.0), target)
    p = torch.sigmoid(torch.tensor(4.0))
    assert torch.allclose(easy, 0.25 * (1 - p) ** 2 * -torch.log(p), atol=1e-7)
    assert hard > 1000 * easy


def test_dice_loss_matches_hand_computed_value():
    logits = torch.zeros(1, 2, 2)  # p = 0.5 on 4 pixels
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # 1 - (2 * 1 + 1) / (2 + 2 + 1) with the smoothing term 1
    assert torch.allclose(losses.dice_loss(logits, target), torch.tensor([0.4]), atol=1e-6)


def test_mask_loss_is_twenty_focal_plus_one_dice():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, generator=g)
    target = torch.rand(3, 8, 8, generator=g) > 0.5
    expected = 20 * losses.focal_loss(logits, target) + losses.dice_loss(logits, target)
    assert torch.allclose(losses.mask_loss(logits, target), expected)


def test_min_over_three_routes_mask_gradient_only_to_the_best_candidate():
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, 2:6, 2:6] = True
    good = torch.where(target[0], 5.0, -5.0)
    logits = torch.stack([torch.full((8, 8), 3.0), good, torch.full((8, 8), -3.0)])[None].requires_grad_(True)
    iou_pred = torch.zeros(1, 3, requires_grad=True)
    mask_l, iou_l = losses.min_over_candidates_loss(logits, iou_pred, target)
    mask_l.backward()
    grad = logits.grad[0].flatten(1).abs().sum(1)
    assert grad[1] > 0 and grad[0] == 0 and grad[2] == 0
    assert torch.allclose(mask_l, losses.mask_loss(good[None], target))


def test_iou_head_loss_regresses_the_actual_iou():
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    target[:, :2] = True  # 8 pixels
    logits = torch.full((2, 4, 4), -1.0)
    logits[0, :2] = 1.0  # exact: IoU 1
    logits[1, :1] = 1.0  # half: IoU 0.5
    iou_pred = torch.tensor([0.5, 0.5])
    assert torch.allclose(losses.mask_iou(logits, target), torch.tensor([1.0, 0.5]))
    assert torch.allclose(losses.iou_head_loss(iou_pred, logits, target), torch.tensor((0.25 + 0.0) / 2))


def test_matched_loss_assigns_each_level_to_the_candidate_that_fits_it():
    sub = torch.zeros(8, 8, dtype=torch.bool)
    sub[3:5, 3:5] = True
    part = torch.zeros(8, 8, dtype=torch.bool)
    part[2:6, 2:6] = True
    whole = torch.ones(8, 8, dtype=torch.bool)
    targets = torch.stack([sub, part, whole])[None]
    as_logits = lambda m: torch.where(m, 6.0, -6.0)  # noqa: E731
    # Candidates come in the order whole, subpart, part.
    logits = torch.stack([as_logits(whole), as_logits(sub), as_logits(part)])[None].requires_grad_(True)
    iou_pred = torch.ones(1, 3, requires_grad=True)
    mask_l, iou_l, assign = losses.matched_candidates_loss(logits, iou_pred, targets)
    assert assign.tolist() == [[2, 0, 1]]
    assert float(iou_l.detach()) < 1e-6  # every candidate exactly matches its assigned target
    (mask_l + iou_l).backward()
    assert iou_pred.grad is not None


def test_focal_weight_block_changes_the_mask_loss_and_restores_sams_weight():
    import torch

    from trimask.training import losses

    logits = torch.randn(2, 16, 16)
    target = (torch.rand(2, 16, 16) > 0.5).float()
    focal = losses.focal_loss(logits, target)
    dice = losses.dice_loss(logits, target)
    with losses.focal_weight(0.0):
        torch.testing.assert_close(losses.mask_loss(logits, target), dice)
    torch.testing.assert_close(losses.mask_loss(logits, target), 20 * focal + dice)


def test_focal_ramp_rises_from_zero_to_sams_weight():
    from trimask.training.trainer import TrainConfig, focal_weight_at

    cfg = TrainConfig(focal_ramp=(0.1, 0.5))
    assert focal_weight_at(0.0, cfg) == 0.0
    assert focal_weight_at(0.1, cfg) == 0.0
    assert abs(focal_weight_at(0.3, cfg) - 10.0) < 1e-9
    assert focal_weight_at(0.5, cfg) == 20.0 and focal_weight_at(0.9, cfg) == 20.0
    assert focal_weight_at(0.0, TrainConfig()) == 20.0  # fine-tuning: SAM's objective throughout
    assert focal_weight_at(0.5, TrainConfig(focal_weight=2.0)) == 2.0
    assert abs(focal_weight_at(0.3, TrainConfig(focal_weight=2.0, focal_ramp=(0.1, 0.5))) - 1.0) < 1e-9


def test_level_curriculum_goes_from_wholes_to_parts_to_the_full_hierarchy():
    import numpy as np

    from trimask.training.trainer import TrainConfig, levels_at, restrict_levels

    cfg = TrainConfig(level_curriculum=(0.1, 0.25))
    assert [levels_at(f, cfg) for f in (0.0, 0.09, 0.1, 0.2, 0.25, 0.9)] == [1, 1, 2, 2, 3, 3]
    assert levels_at(0.0, TrainConfig()) == 3  # no curriculum: the full hierarchy from the start

    sub, part, whole = (np.zeros((8, 8), bool) for _ in range(3))
    whole[:, :] = True
    part[:4] = True
    sub[:2, :2] = True
    single = [np.ones((8, 8), bool)]  # e.g. one COCO mask: never changed
    groups = [[sub, part, whole], single]
    one, two, three = (restrict_levels(groups, n) for n in (1, 2, 3))
    assert len(one[0]) == 1 and one[0][0] is whole
    assert [m is x for m, x in zip(two[0], (part, part, whole))] == [True] * 3
    assert three[0] == [sub, part, whole]
    assert one[1] is single and two[1] is single


def _nearer_click_preference(sam, rng) -> float:
    """Over cells near one of two random clicks (within 0.15 of the image side, clearly nearer one), the
    fraction whose layer-0 image->token attention (positional encodings only) prefers the nearer click."""
    pe_layer = sam.prompt_encoder.pe_layer
    attn = sam.mask_decoder.transformer.layers[0].cross_attn_image_to_token
    cells = pe_layer((16, 16)).flatten(1).T  # 256 cells x 256
    centres = (torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="xy"), -1).reshape(-1, 2) + 0.5) / 16
    hits = []
    for _ in range(20):
        clicks = torch.tensor(rng.uniform(0.1, 0.9, (2, 2)), dtype=torch.float32)
        keys = pe_layer._pe_encoding(clicks)  # 2 x 256
        logits = attn.q_proj(cells) @ attn.k_proj(keys).T  # cells x 2
        dist = torch.cdist(centres, clicks)
        chosen = (dist.min(1).values < 0.15) & ((dist[:, 0] - dist[:, 1]).abs() > 0.1)
        hits.append((logits.argmax(1) == dist.argmin(1))[chosen].float().mean())
    return float(torch.stack(hits).nanmean())


def test_similarity_init_makes_image_tokens_attend_to_the_nearer_click():
    import numpy as np

    from trimask.models.build import construct_sam
    from trimask.training.trainer import similarity_init

    torch.manual_seed(0)
    sam = construct_sam("tiny")
    before = _nearer_click_preference(sam, np.random.default_rng(0))
    similarity_init(sam)
    for layer in sam.mask_decoder.transformer.layers:
        attn = layer.cross_attn_image_to_token
        assert torch.equal(attn.q_proj.weight, attn.k_proj.weight)
        w = attn.q_proj.weight
        assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5)
    after = _nearer_click_preference(sam, np.random.default_rng(0))
    assert after > 0.9
    assert after > before + 0.2


def test_window_origins_hold_the_whole_or_else_the_first_click_target_inside_the_grid():
    import numpy as np

    from trimask.training.trainer import window_origins

    targets = np.zeros((4, 3, 256, 256), bool)
    targets[0, :, 140:220, 150:230] = True  # cells 35..54 x 37..57: fits a 32-cell window
    targets[1, :, 0:20, 0:30] = True  # in the corner: the window starts at 0
    targets[2, 2, 10:250, 100:120] = True  # a whole 60 cells tall ...
    targets[2, :2, 200:240, 100:120] = True  # ... whose subpart and part sit low in it: the window holds those
    targets[3, :, 10:250, 100:120] = True  # nothing fits: centred on the smallest
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        o = window_origins(targets, 32, 64, rng)
        assert ((o >= 0) & (o <= 32)).all()
        y, x = o[0]
        assert 4 * y <= 140 and 4 * (y + 32) >= 220 and 4 * x <= 150 and 4 * (x + 32) >= 230
        seen.add((int(y), int(x)))
        assert tuple(o[1]) == (0, 0)
        assert 4 * o[2, 0] <= 200 and 4 * (o[2, 0] + 32) >= 240
        assert o[3, 0] == 16 and 4 * o[3, 1] <= 100 and 4 * (o[3, 1] + 32) >= 120
    assert len(seen) > 10  # random among the windows that hold it


def test_prompts_whose_target_vanishes_at_low_resolution_are_left_out():
    import numpy as np

    from trimask.models.build import build_sam
    from trimask.training import trainer

    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True)
    big = np.zeros((1024, 1024), bool)
    big[100:400, 100:400] = True
    speck = np.zeros((1024, 1024), bool)
    speck[700, 700] = True  # one pixel: nothing of it at 256 x 256
    sample = trainer.Sample(np.zeros((1024, 1024, 3), np.uint8), [[speck], [big], [speck]])
    cfg = trainer.TrainConfig(rounds=2, box_start_prob=0.0)
    for seed in range(3):
        loss, stats = trainer.image_step_loss(sam, torch.randn(1, 256, 64, 64), sample, cfg, np.random.default_rng(seed))
        assert torch.isfinite(loss) and loss > 0 and "iou_r2" in stats
    only_speck = trainer.Sample(sample.image, [[speck]])
    loss, stats = trainer.image_step_loss(sam, torch.randn(1, 256, 64, 64), only_speck, cfg, np.random.default_rng(0))
    assert float(loss) == 0.0 and stats == {}


def test_decoder_with_one_image_window_per_prompt_matches_separate_calls():
    from trimask.models.build import construct_sam

    torch.manual_seed(0)
    dec = construct_sam("tiny").mask_decoder.eval()
    images, pes = torch.randn(2, 256, 16, 16), torch.randn(2, 256, 16, 16)
    sparse, dense = torch.randn(2, 3, 256), torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        masks, iou = dec(images, pes, sparse, dense, True, per_prompt_images=True)
        for i in range(2):
            one_masks, one_iou = dec(images[i : i + 1], pes[i : i + 1], sparse[i : i + 1], dense[i : i + 1], True)
            assert torch.allclose(masks[i], one_masks[0], atol=1e-5)
            assert torch.allclose(iou[i], one_iou[0], atol=1e-5)
        shared, _ = dec(images[:1], pes[:1], sparse, dense, True)  # official: one image for every prompt
    assert not torch.allclose(shared[1], masks[1], atol=1e-3)
