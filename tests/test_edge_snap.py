"""Snapped edges (trimask.edge_snap) and ``trimask eval --edges``."""
import json

import numpy as np
import torch

from trimask.cli import main
from trimask.edge_snap import area_resize, box_mean, guide_for, snap
from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.evaluate import _iou, answer_masks, box_answers, click_instances, postprocess
from trimask.training.scenes import generate_scene
from trimask.training.trainer import save_checkpoint


def _step(h: int, w: int, edge: float) -> np.ndarray:
    """Logits over the 256 frame of an h x w image, positive left of image column ``edge``."""
    x = np.arange(256) + 0.5
    return np.tile((edge * 256 / max(h, w) - x) * 2, (256, 1)).astype(np.float32)


def test_box_mean_and_area_resize_match_brute_force():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 9, 2))
    m = box_mean(a, 2)
    for y, x in [(0, 0), (3, 4), (6, 8), (1, 7)]:
        win = a[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
        assert np.allclose(m[y, x], win.reshape(-1, 2).mean(0))
    img = rng.integers(0, 256, (4, 6, 3))
    assert np.allclose(area_resize(img, 2, 3)[1, 2], img[2:4, 4:6].reshape(-1, 3).mean(0))
    assert np.allclose(area_resize(img, 3, 4)[1, 1], img[1:3, 1:3].reshape(-1, 3).mean(0))  # overlapping bins


def test_snap_moves_an_edge_onto_the_colour_edge_and_keeps_it_on_a_flat_image():
    h, w = 300, 640  # 2.5 pixels a cell of the 256 frame
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :320] = (200, 40, 40)
    img[:, 320:] = (30, 90, 210)
    for decoder_edge in (316, 322):
        m = snap(_step(h, w, decoder_edge), img)
        assert m[:, :320].all() and not m[:, 320:].any()
    raw = postprocess(torch.from_numpy(_step(h, w, 316))[None, None], (h, w))[0, 0].numpy()
    assert raw[:, :316].all() and not raw[:, 316:].any()
    far = snap(_step(h, w, 300), img)  # 8 cells away: beyond the windows, kept
    assert far[:, :300].all() and not far[:, 300:].any()
    flat = np.full((h, w, 3), 128, np.uint8)
    assert abs(int(snap(_step(h, w, 316), flat).sum()) - int(raw.sum())) <= h
    # A grey image (no channel axis) and an RGBA one snap as their RGB forms.
    grey = img.mean(axis=2).astype(np.uint8)
    assert (snap(_step(h, w, 316), grey) == snap(_step(h, w, 316), np.repeat(grey[..., None], 3, axis=2))).all()
    rgba = np.concatenate([img, np.full((h, w, 1), 255, np.uint8)], axis=2)
    assert (snap(_step(h, w, 316), rgba) == snap(_step(h, w, 316), img)).all()


def test_snapped_answers_of_the_bundled_model_fit_a_scene_better():
    """On a held-out scene the bundled model's subpart candidates, snapped, overlap the subparts more."""
    torch.set_num_threads(2)
    sam = build_sam("tiny").eval()
    before, after = [], []
    for i in range(4):
        scene = generate_scene(10**9 + 50 + i)
        inst = click_instances(scene, 2, np.random.default_rng(i))
        targets = [s for s, _, _ in inst]
        if not targets:
            continue
        hw = scene.image.shape[:2]
        with torch.no_grad():
            emb = sam.image_encoder(preprocess(scene.image))
            rng = np.random.default_rng(0)
            raw = box_answers(sam, emb, hw, targets, rng)
            snapped = box_answers(sam, emb, hw, targets, np.random.default_rng(0), scene.image)
        before += [_iou(m, t) for m, t in zip(raw, targets)]
        after += [_iou(m, t) for m, t in zip(snapped, targets)]
    assert len(after) >= 4
    assert np.mean(after) > np.mean(before) + 0.03


def test_answer_masks_snaps_each_answer_with_the_image_guide():
    scene = generate_scene(10**9 + 7)
    low = torch.from_numpy(np.stack([_step(256, 256, 100), _step(256, 256, 180)]))[None]  # 1 x 2 x 256 x 256
    plain = answer_masks(low, (256, 256))
    assert (plain == postprocess(low, (256, 256)).numpy()).all()
    snapped = answer_masks(low, (256, 256), scene.image)
    guide = guide_for(scene.image)
    for k in range(2):
        assert (snapped[0, k] == snap(low[0, k].numpy(), scene.image, guide)).all()


def test_eval_command_snaps_edges_for_tiny_by_default(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(build_sam("tiny", random_init=True), ckpt, {"encoder_kwargs": {}})
    out = tmp_path / "m.json"
    assert main(["eval", "--model", "tiny", "--checkpoint", str(ckpt), "--scenes", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["edges"] == "snap"
    assert main(["eval", "--model", "tiny", "--checkpoint", str(ckpt), "--scenes", "1", "--edges", "off",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["edges"] == "off"
