"""trimask eval: runs on a couple of held-out scenes and reports metrics in [0, 1]."""
import json
import math

import numpy as np
import torch
from scipy import ndimage

from trimask.cli import main
from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.evaluate import center_point, click_answers, click_instances, evaluate, first_answers, keep_clicked_regions
from trimask.training.scenes import generate_scene
from trimask.training.trainer import save_checkpoint


def test_evaluate_returns_every_metric_in_unit_range():
    torch.set_num_threads(2)
    sam = build_sam("tiny", random_init=True)
    m = evaluate(sam, scenes=2, seed=3)
    assert m["clicks"] >= 1 and m["scenes"] == 2
    names = ["best_of_3_subpart", "best_of_3_part", "best_of_3_whole", "ranked_first", "area_ordered",
             "miou_1_clicks", "miou_3_clicks", "miou_5_clicks", "box_subpart", "box_part", "box_whole"]
    for name in names:
        assert not math.isnan(m[name]) and 0.0 <= m[name] <= 1.0, name


def test_eval_command_writes_metrics_for_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(build_sam("tiny", random_init=True), ckpt, {"encoder_kwargs": {}})
    out = tmp_path / "m.json"
    assert main(["eval", "--model", "tiny", "--checkpoint", str(ckpt), "--scenes", "1", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert "best_of_3_whole" in metrics and "miou_5_clicks" in metrics
    assert metrics["regions"] == "clicked"  # the browser's default for tiny
    assert "best_of_3_subpart" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny", "--checkpoint", str(ckpt), "--scenes", "1", "--regions", "all",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["regions"] == "all"


def test_keep_clicked_regions_keeps_the_8_connected_regions_under_positive_clicks():
    m = np.zeros((6, 8), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one region
    m[4:6, 5:8] = True
    m[0, 6] = True
    kept = keep_clicked_regions(m, [(1.7, 1.2)])  # (x, y): pixel row 1, column 1
    assert kept.sum() == 2 and kept[0, 0] and kept[1, 1]
    both = keep_clicked_regions(m, [(0.0, 0.0), (6.5, 4.5)])
    assert both.sum() == 8 and not both[0, 6]
    # No click on the mask (beside it, off the image): the mask as it is.
    assert keep_clicked_regions(m, [(3.0, 3.0), (-1.0, 0.0), (8.0, 0.0)]) is m
    assert keep_clicked_regions(m, []) is m


def test_clicked_regions_protocol_keeps_only_regions_that_hold_a_positive_click():
    torch.set_num_threads(2)
    sam = build_sam("tiny").eval()
    scene = generate_scene(10**9 + 3)
    inst = click_instances(scene, 2, np.random.default_rng(0))
    assert inst
    targets = [lv for levels in inst for lv in levels]
    hw = scene.image.shape[:2]
    with torch.no_grad():
        emb = sam.image_encoder(preprocess(scene.image))
        first = first_answers(sam, emb, hw, targets)
        raw = click_answers(sam, emb, hw, targets, first, clicks=1)[0]
        kept = click_answers(sam, emb, hw, targets, first, clicks=1, regions=True)[0]
    cut = 0
    for r, k, t in zip(raw, kept, targets):
        x, y = center_point(t)  # the protocol's first click
        if not r[int(y), int(x)]:
            assert (k == r).all()  # the click is not on the answer: nothing to keep it by
            continue
        regions = ndimage.label(r, structure=np.ones((3, 3), bool))[0]
        assert (k == (regions == regions[int(y), int(x)])).all()  # the click's own region, whole
        cut += int(r.sum() - k.sum())
    assert cut > 0  # the bundled model's answers here spill onto regions away from the click


def test_eval_rejects_zero_scenes(capsys):
    assert main(["eval", "--model", "tiny", "--scenes", "0"]) == 1
    assert "--scenes" in capsys.readouterr().err
