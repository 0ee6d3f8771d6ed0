"""Simulated clicks: where they land, their labels, and determinism by seed."""
import numpy as np
import pytest

from trimask.training.prompt_simulation import center_of_largest_error, noisy_box, sample_error_click, sample_point_in


def _masks():
    gt = np.zeros((32, 32), bool)
    gt[4:20, 4:20] = True
    pred = np.zeros((32, 32), bool)
    pred[8:20, 4:28] = True  # misses rows 4..7 (false negative), spills into columns 20..27 (false positive)
    return pred, gt


def test_error_clicks_land_in_the_error_region_with_the_right_label():
    pred, gt = _masks()
    rng = np.random.default_rng(0)
    labels = set()
    for _ in range(200):
        (x, y), label = sample_error_click(pred, gt, rng)
        x, y = int(x), int(y)
        assert pred[y, x] != gt[y, x]
        assert label == int(gt[y, x])  # positive in a false negative, negative in a false positive
        labels.add(label)
    assert labels == {0, 1}


def test_no_click_when_the_prediction_is_exact():
    _, gt = _masks()
    assert sample_error_click(gt.copy(), gt, np.random.default_rng(0)) is None
    assert center_of_largest_error(gt.copy(), gt) is None


def test_clicks_are_deterministic_by_seed():
    pred, gt = _masks()
    a = [sample_error_click(pred, gt, np.random.default_rng(7)) for _ in range(3)]
    b = [sample_error_click(pred, gt, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    assert np.array_equal(noisy_box(gt, np.random.default_rng(3)), noisy_box(gt, np.random.default_rng(3)))
    assert sample_point_in(gt, np.random.default_rng(1)) == sample_point_in(gt, np.random.default_rng(1))


def test_standard_click_is_the_centre_of_the_largest_error_region():
    gt = np.zeros((40, 40), bool)
    gt[5:16, 5:16] = True  # 11 x 11 missed square: centre (10, 10)
    gt[30:33, 30:33] = True  # a smaller missed square
    pred = np.zeros_like(gt)
    pred[0:2, 30:40] = True  # a 20-pixel false positive, smaller than 121
    (x, y), label = center_of_largest_error(pred, gt)
    assert (x, y) == (10.0, 10.0) and label == 1
    # When the false positive is the largest error, the click is negative and inside it.
    pred2 = gt.copy()
    pred2[20:40, 0:10] = True
    (x, y), label = center_of_largest_error(pred2, gt)
    assert label == 0 and pred2[int(y), int(x)] and not gt[int(y), int(x)]


def test_noisy_box_stays_in_the_image_and_near_the_mask():
    _, gt = _masks()
    for seed in range(20):
        x0, y0, x1, y1 = noisy_box(gt, np.random.default_rng(seed))
        assert 0 <= x0 <= x1 <= 31 and 0 <= y0 <= y1 <= 31
        assert abs(x0 - 4) <= 4 and abs(x1 - 19) <= 4


@pytest.mark.parametrize("window", [0, 32])
def test_each_round_adds_a_click_on_the_previous_errors_and_feeds_its_logits_back(monkeypatch, window):
    """The simulated interaction (trainer.image_step_loss): round 1 is the first click with the three
    candidates; every later round adds one click drawn from the error region of the previous round's
    prediction (labelled by the target there) and passes that prediction's logits as mask input.
    With window training each prompt's decoder sees its own window of the embedding and of the
    positional encoding, holding the target, and its clicks are mapped back to the whole image."""
    import torch

    from trimask.models.build import build_sam
    from trimask.training import losses, trainer

    calls = []
    real_decode = trainer.decode

    def recording_decode(sam, embedding, points, labels, boxes, mask_input, multimask, image_pe=None):
        logits, iou = real_decode(sam, embedding, points, labels, boxes, mask_input, multimask, image_pe)
        calls.append((points.clone(), labels.clone(), None if mask_input is None else mask_input.clone(), multimask,
                      logits.detach(), embedding, image_pe))
        return logits, iou

    monkeypatch.setattr(trainer, "decode", recording_decode)
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True)
    if window:
        sam.prompt_encoder.image_embedding_size = (window, window)
    mask = np.zeros((256, 256), bool)  # one mask per group (not a hierarchy): each round's target is it
    mask[140:220, 150:230] = True  # 20 x 20 cells, away from the corner: windows start inside the grid
    sample = trainer.Sample(np.zeros((256, 256, 3), np.uint8), [[mask], [mask]])
    cfg = trainer.TrainConfig(rounds=3, box_start_prob=0.0)
    embedding = torch.randn(1, 256, 64, 64)
    loss, stats = trainer.image_step_loss(sam, embedding, sample, cfg, np.random.default_rng(0), window)

    assert torch.isfinite(loss) and set(stats) >= {"iou_r1_best", "iou_r2", "iou_r3"}
    assert [c[0].shape[1] for c in calls] == [1, 2, 3]  # one more click per round, per interaction
    assert [c[3] for c in calls] == [True, False, False]  # three candidates first, then the single mask
    assert calls[0][2] is None
    full_target = trainer.low_res_target(mask)  # 256 x 256 image: one low-res pixel per image pixel
    origins = [(0, 0), (0, 0)]
    if window:
        pe = sam.prompt_encoder.pe_layer((64, 64))
        origins = []
        for i in range(2):  # find each prompt's window in the full embedding
            win = calls[0][5][i]
            found = [(y, x) for y in range(33) for x in range(33)
                     if torch.equal(embedding[0, :, y:y + window, x:x + window], win)]
            assert len(found) == 1
            y, x = found[0]
            assert torch.equal(calls[0][6][i], pe[:, y:y + window, x:x + window])
            assert 4 * y <= 140 and 4 * (y + window) >= 220 and 4 * x <= 150 and 4 * (x + window) >= 230
            assert (y, x) != (0, 0)
            origins.append((y, x))
    for rnd in (1, 2):
        points, labels, mask_input, _, _, _, _ = calls[rnd]
        before = calls[rnd - 1]
        if rnd == 2:
            assert torch.equal(mask_input, before[4])  # the previous round's single-mask logits
        for i, (oy, ox) in enumerate(origins):
            side = mask_input.shape[-1]
            target = full_target[4 * oy : 4 * oy + side, 4 * ox : 4 * ox + side]
            if rnd == 1:  # after the three candidates: the one with the lowest mask loss against the target
                t = torch.from_numpy(target).float()
                best = int(torch.stack([losses.mask_loss(before[4][i, k][None], t[None]).sum() for k in range(3)]).argmin())
                assert torch.equal(mask_input[i, 0], before[4][i, best])
            predicted = np.zeros((256, 256), bool)
            predicted[4 * oy : 4 * oy + side, 4 * ox : 4 * ox + side] = (mask_input[i, 0] > 0).numpy()
            x, y = (points[i, -1] / 4).floor().int().tolist()  # 1024 frame -> low-res pixel
            assert predicted[y, x] != full_target[y, x], "the click is on an error of the previous prediction"
            assert int(labels[i, -1]) == int(full_target[y, x])


def test_fixed_levels_train_each_candidate_on_its_own_level(monkeypatch):
    """With ``fixed_levels`` the first click's candidate k is trained on level k of the clicked hierarchy
    (not on SAM's least-loss assignment), and the next round goes on from the candidate of the level that
    the interaction refines; a click with no subpart (its subpart repeats the part) leaves the subpart
    candidate out. Here the first click's candidates are the three levels in reverse order."""
    import torch

    from trimask.models.build import build_sam
    from trimask.training import losses, trainer

    masks = [np.zeros((256, 256), bool) for _ in range(3)]
    masks[2][40:220, 30:230] = True
    masks[1][60:200, 50:150] = True
    masks[0][90:130, 80:120] = True
    targets = torch.from_numpy(np.stack([trainer.low_res_target(m) for m in masks])).float()
    calls = []
    real_decode = trainer.decode

    def decode(sam, embedding, points, labels, boxes, mask_input, multimask, image_pe=None):
        logits, iou = real_decode(sam, embedding, points, labels, boxes, mask_input, multimask, image_pe)
        if multimask:  # whole, part, subpart
            logits = logits * 0 + (20 * targets.flip(0) - 10)
        calls.append((None if mask_input is None else mask_input.clone(), logits.detach(), iou.detach()))
        return logits, iou

    monkeypatch.setattr(trainer, "decode", decode)
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True)
    sample = trainer.Sample(np.zeros((256, 256, 3), np.uint8), [masks, [masks[1], masks[1], masks[2]]])
    group_targets = torch.stack([targets, targets[[1, 1, 2]]])
    results = {}
    for fixed in (True, False):
        calls.clear()
        cfg = trainer.TrainConfig(rounds=2, box_start_prob=0.0, fixed_levels=fixed)
        loss, _ = trainer.image_step_loss(sam, torch.randn(1, 256, 64, 64), sample, cfg, np.random.default_rng(0))
        results[fixed] = float(loss.detach())
        (_, first, iou1), (prev, second, iou2) = calls
        n = first.shape[0]
        if fixed:  # the second round goes on from the candidate of the level it refines, and refines that level
            level = [next(k for k in range(3) if torch.equal(prev[i, 0], first[i, k])) for i in range(n)]
            t2 = group_targets[torch.arange(n), level]
            m2 = losses.mask_loss(second[:, 0], t2).mean() + losses.iou_head_loss(iou2[:, 0], second[:, 0], t2)
            per = losses.mask_loss(first.flatten(0, 1), group_targets.flatten(0, 1))
            m1 = per[[0, 1, 2, 4, 5]].mean()  # not the second click's subpart candidate
            i1 = losses.iou_head_loss(iou1.flatten(), first.flatten(0, 1), group_targets.flatten(0, 1))
            assert results[fixed] == pytest.approx(float((m1 + i1 + m2) / 2), rel=1e-4)
    # SAM's assignment finds the levels on the reversed candidates; the fixed one trains them on their own
    assert results[True] > results[False] + 1.0
