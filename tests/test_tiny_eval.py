"""trimask eval: runs on a couple of held-out scenes and reports metrics in [0, 1]."""
import json
import math

import torch

from trimask.cli import main
from trimask.models.build import build_sam
from trimask.training.evaluate import evaluate
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
    assert "best_of_3_subpart" in capsys.readouterr().out


def test_eval_rejects_zero_scenes(capsys):
    assert main(["eval", "--model", "tiny", "--scenes", "0"]) == 1
    assert "--scenes" in capsys.readouterr().err
