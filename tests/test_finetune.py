"""Fine-tuning on a small COCO file: the loss falls, held-out IoU rises, the result loads with build_sam."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from trimask.errors import TrimaskError
from trimask.models.build import build_sam
from trimask.training.coco_dataset import hierarchy_groups, load_coco_images
from trimask.training.finetune import click_miou, finetune
from trimask.training.trainer import save_checkpoint


def _write_coco(tmp_path, n_images: int, seed: int, name: str):
    """Bright shapes on dark backgrounds, one RLE annotation per shape, plus one polygon annotation."""
    rng = np.random.default_rng(seed)
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    yy, xx = np.mgrid[0:128, 0:160]
    for i in range(n_images):
        img = np.full((128, 160, 3), rng.integers(0, 60), np.uint8)
        anns = []
        for _ in range(2):
            cy, cx, r = rng.integers(30, 98), rng.integers(30, 130), rng.integers(14, 26)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if rng.uniform() < 0.5 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
            img[m] = rng.integers(150, 256, 3)
            anns.append(m)
        fname = f"{name}_{i}.png"
        Image.fromarray(img).save(images_dir / fname)
        coco["images"].append({"id": i + 1, "file_name": fname, "height": 128, "width": 160})
        for m in anns:  # visible masks (the second shape may cover the first)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": 1,
                                        "segmentation": rle, "iscrowd": 0})
        anns[0] &= ~anns[1]
    coco["annotations"][0]["segmentation"] = [[10, 10, 40, 10, 40, 40, 10, 40]]  # a polygon parses too
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path, images_dir


def test_hierarchy_groups_order_nested_masks_smallest_first():
    small = np.zeros((10, 10), bool)
    small[4:6, 4:6] = True
    mid = np.zeros((10, 10), bool)
    mid[2:8, 2:8] = True
    big = np.ones((10, 10), bool)
    groups = hierarchy_groups([mid, big, small])
    assert [int(m.sum()) for m in groups[2]] == [4, 36, 100]
    assert [int(m.sum()) for m in groups[1]] == [100]


@pytest.mark.slow
def test_finetune_lowers_loss_raises_held_out_iou_and_loads(tmp_path):
    torch.set_num_threads(2)
    train_file, images_dir = _write_coco(tmp_path, 6, seed=0, name="train")
    held_file, _ = _write_coco(tmp_path, 3, seed=1, name="held")
    train_images = load_coco_images(train_file, images_dir)
    held_images = load_coco_images(held_file, images_dir)
    sam = build_sam("tiny", random_init=True)
    before = click_miou(sam, held_images, clicks=2)
    out = tmp_path / "tuned.pt"
    summary = finetune(sam, train_images, steps=30, lr=1e-3, prompts_per_image=2, rounds=2, out=out, log=lambda s: None)
    assert summary["loss"] < summary["first_loss"]
    after = click_miou(sam, held_images, clicks=2)
    assert after > before + 0.05
    reloaded = build_sam("tiny", out)
    assert click_miou(reloaded, held_images[:1], clicks=2) == pytest.approx(click_miou(sam, held_images[:1], clicks=2), abs=1e-6)


def test_focal_weight_reaches_the_loss_and_rejects_negative(tmp_path):
    """--focal-weight 0 trains on dice alone: from the same weights and seed the first loss is lower than
    with SAM's 20 x focal, and lower still than with 40."""
    torch.set_num_threads(1)
    train_file, images_dir = _write_coco(tmp_path, 1, seed=0, name="one")
    images = load_coco_images(train_file, images_dir)
    first = {}
    for weight in (0.0, 20.0, 40.0):
        sam = build_sam("tiny", random_init=True)
        first[weight] = finetune(sam, images, steps=1, prompts_per_image=2, rounds=1, focal_weight=weight,
                                 log=lambda s: None)["first_loss"]
    assert first[0.0] < first[20.0] < first[40.0]
    with pytest.raises(TrimaskError, match="focal-weight"):
        finetune(build_sam("tiny", random_init=True), images, steps=1, focal_weight=-1.0, log=lambda s: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_the_gpu_matches_the_cpu_and_writes_a_cpu_checkpoint(tmp_path):
    from trimask.training.scenes import generate_scene
    from trimask.training.trainer import TrainConfig, scene_to_sample, train

    # One coarse step and two at the full grid, both interaction rounds.
    cfg = TrainConfig(seed=0, steps=3, prompts_per_image=4, rounds=2, coarse_steps=1, warmup_steps=1)
    runs = {}
    for device in ("cpu", "cuda"):
        sam = build_sam("tiny").to(device)
        runs[device] = train(sam, cfg, lambda i, rng: scene_to_sample(generate_scene(i), rng, n_groups=4),
                             out=tmp_path / f"{device}.pt", log=lambda _: None)
    assert runs["cuda"]["steps"] == 3
    assert runs["cuda"]["first_loss"] == pytest.approx(runs["cpu"]["first_loss"], rel=1e-2)
    state = torch.load(tmp_path / "cuda.pt", weights_only=True)["model"]
    assert all(v.device.type == "cpu" for v in state.values())
    build_sam("tiny", tmp_path / "cuda.pt")


def test_the_code_match_layout_is_found_anywhere_in_the_record_chain():
    from trimask.models.build import BUNDLED_TINY_CHECKPOINT, read_checkpoint
    from trimask.training.finetune import uses_code_match_layout

    _, bundled = read_checkpoint(BUNDLED_TINY_CHECKPOINT)
    assert uses_code_match_layout(bundled)  # its last commands started from --init; a record down its chain says so
    assert uses_code_match_layout({"init_record": {"init_record": {"code_match_start": True}}})
    assert not uses_code_match_layout({"init_record": {"code_match_start": False, "init_record": None}})
    assert not uses_code_match_layout({})


def test_auto_recipe_follows_the_checkpoint_and_code_path_needs_the_tiny_encoder():
    from trimask.models.build import build_sam_and_extra
    from trimask.training.finetune import resolve_recipe

    tiny, record = build_sam_and_extra("tiny")
    assert resolve_recipe("auto", tiny, record) == "code-path"
    assert resolve_recipe("sam", tiny, record) == "sam"
    assert resolve_recipe("auto", build_sam("tiny", random_init=True), {}) == "sam"
    vit, _ = build_sam_and_extra("vit_t")
    assert resolve_recipe("auto", vit, {}) == "sam"
    with pytest.raises(TrimaskError, match="code path"):
        resolve_recipe("code-path", vit, {})
    with pytest.raises(TrimaskError, match="recipe"):
        resolve_recipe("decoder", tiny, record)


def test_the_code_path_recipe_trains_the_code_path_alone(tmp_path):
    """The laid-out decoder, the prompt encoder, the trunk and the pattern head come out bit for bit; the code
    path moves; the run is recorded with the stage's loss settings."""
    from trimask.training.code_path import CODE_PATH

    torch.set_num_threads(2)
    train_file, images_dir = _write_coco(tmp_path, 2, seed=0, name="train")
    sam = build_sam("tiny")
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    out = tmp_path / "tuned.pt"
    summary = finetune(sam, load_coco_images(train_file, images_dir), steps=2, prompts_per_image=2, rounds=2,
                       recipe="code-path", out=out, log=lambda s: None)
    after = sam.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(CODE_PATH) for k in moved)
    assert any(k.startswith("image_encoder.neck.") for k in moved)
    record = summary["record"]
    assert (record["logit_scale"], record["focal_weight"], record["iou_loss_weight"]) == (4.0, 1.0, 0.0)
    assert torch.load(out, weights_only=False)["finetune"]["recipe"] == "code-path"
    with pytest.raises(TrimaskError, match="recipe"):
        finetune(sam, load_coco_images(train_file, images_dir), steps=1, recipe="auto", log=lambda s: None)
    with pytest.raises(TrimaskError, match="train-encoder"):
        finetune(sam, load_coco_images(train_file, images_dir), steps=1, recipe="code-path", train_encoder=True,
                 log=lambda s: None)


def test_the_logit_scale_is_what_the_mask_losses_see(monkeypatch):
    """With the decoder's answers fixed, a run at scale 2 scores logits L exactly as scale 1 scores 2 L (the
    corrective clicks and the IoU head's targets follow the sign, which the scale keeps)."""
    from trimask.training import trainer
    from trimask.training.scenes import generate_scene

    scene = generate_scene(3)
    sample = trainer.scene_to_sample(scene, np.random.default_rng(0), n_groups=3)
    base = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 0.5
    iou = torch.full((3, 3), 0.5)

    def loss_at(scale: float, factor: float) -> float:
        def fixed(sam, emb, pts, lbl, boxes, prev, multimask, image_pe=None):
            k = 3 if multimask else 1
            return base[: len(pts), :k] * factor, iou[: len(pts), :k]
        monkeypatch.setattr(trainer, "decode", fixed)
        cfg = trainer.TrainConfig(rounds=3, box_start_prob=0.0, logit_scale=scale)
        loss, _ = trainer.image_step_loss(None, torch.zeros(1, 256, 64, 64), sample, cfg, np.random.default_rng(1))
        return float(loss)

    assert loss_at(2.0, 1.0) == pytest.approx(loss_at(1.0, 2.0), rel=1e-6)
    assert loss_at(2.0, 1.0) != pytest.approx(loss_at(1.0, 1.0), rel=1e-3)


def _write_scene_coco(tmp_path, seeds, name: str):
    """Generated scenes saved as an annotator would: every visible whole, part and subpart as an RLE."""
    from trimask.training.scenes import generate_scene

    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, seed in enumerate(seeds, 1):
        scene = generate_scene(seed)
        Image.fromarray(scene.image).save(images_dir / f"{name}_{seed}.png")
        h, w = scene.image.shape[:2]
        coco["images"].append({"id": i, "file_name": f"{name}_{seed}.png", "height": h, "width": w})
        for labels in (scene.whole_map, scene.part_map, scene.subpart_map):
            for k in np.unique(labels[labels > 0]):
                rle = mask_utils.encode(np.asfortranarray((labels == k).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": 1,
                                            "segmentation": rle, "iscrowd": 0})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path, images_dir


@pytest.mark.slow
def test_the_code_path_recipe_keeps_the_bundled_model_where_sams_recipe_breaks_it(tmp_path):
    """The bundled tiny fine-tuned on its own kind of data: SAM's recipe moves the laid-out decoder's weights
    and its held-out answers fall; the code path's keeps them."""
    torch.set_num_threads(2)
    train_file, images_dir = _write_scene_coco(tmp_path, range(9_000_000, 9_000_004), "train")
    held_file, _ = _write_scene_coco(tmp_path, range(9_100_000, 9_100_002), "held")
    train_images, held_images = load_coco_images(train_file, images_dir), load_coco_images(held_file, images_dir)
    shipped = click_miou(build_sam("tiny"), held_images, clicks=2)
    after = {}
    for recipe in ("sam", "code-path"):
        sam = build_sam("tiny")
        finetune(sam, train_images, steps=20, prompts_per_image=3, rounds=2, recipe=recipe, log=lambda s: None)
        after[recipe] = click_miou(sam, held_images, clicks=2)
    assert after["code-path"] > shipped - 0.03
    assert after["sam"] < shipped - 0.1


def test_the_command_fine_tunes_the_bundled_model_by_its_code_path_and_keeps_its_record(tmp_path):
    import subprocess
    import sys

    from trimask.models.build import read_checkpoint
    from trimask.training.finetune import uses_code_match_layout

    train_file, images_dir = _write_coco(tmp_path, 1, seed=0, name="train")
    out = tmp_path / "tuned.pt"
    run = subprocess.run([sys.executable, "-m", "trimask.cli", "finetune", "--model", "tiny", "--coco", str(train_file),
                          "--images", str(images_dir), "--out", str(out), "--steps", "1", "--device", "cpu"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "recipe: code-path" in run.stderr
    _, extra = read_checkpoint(out)
    assert extra["finetune"]["recipe"] == "code-path" and extra["finetune"]["focal_weight"] == 1.0
    assert uses_code_match_layout(extra)  # a second fine-tune of the result picks the code path again
    assert build_sam("tiny", out).image_encoder.pattern_offset == extra["encoder_kwargs"]["pattern_offset"] == 160
