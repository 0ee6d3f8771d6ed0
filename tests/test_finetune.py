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
