"""Training samples from a COCO instance-segmentation file (trimask's own export or any other).

Each annotation is one click group. Annotations of the same image nested inside each other
(e.g. a subpart, its part and the whole saved from one click) form a hierarchy: the group of a
mask lists it and the up to two smallest annotations containing it, smallest first, so the
three multimask candidates learn the levels as with generated scenes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from trimask.errors import TrimaskError
from trimask.image_io import load_image
from trimask.training.trainer import Sample

CONTAINED = 0.95  # share of a mask inside another for the other to count as its parent level


@dataclass
class CocoImage:
    """One image of the file with its decoded annotation masks (``H x W`` bool each)."""

    file_name: str
    image: np.ndarray
    masks: list[np.ndarray]


def _decode(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict):
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise TrimaskError("A COCO annotation has a segmentation that is neither polygons nor RLE.")
    return mask_utils.decode(rle).astype(bool)


def load_coco_images(coco_path: Path, images_dir: Path, *, min_area: int = 16) -> list[CocoImage]:
    """Read the COCO file and its images; annotations smaller than ``min_area`` pixels are skipped."""
    try:
        coco = json.loads(Path(coco_path).read_text())
    except FileNotFoundError:
        raise TrimaskError(f"COCO file not found: {coco_path}.") from None
    except (OSError, ValueError) as exc:
        raise TrimaskError(f"Could not read COCO file {coco_path}: {exc}.") from None
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise TrimaskError(f"{coco_path} is not a COCO instance file (it needs 'images' and 'annotations').")
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for info in coco["images"]:
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        image = load_image(Path(images_dir) / info["file_name"])
        h, w = image.shape[:2]
        masks = [m for m in (_decode(a["segmentation"], h, w) for a in anns) if m.sum() >= min_area]
        if masks:
            out.append(CocoImage(info["file_name"], image, masks))
    if not out:
        raise TrimaskError(f"{coco_path} has no usable annotated images in {images_dir}.")
    return out


def hierarchy_groups(masks: list[np.ndarray]) -> list[list[np.ndarray]]:
    """One group per mask: the mask and up to two smallest masks containing it, smallest first."""
    areas = [int(m.sum()) for m in masks]
    groups = []
    for i, m in enumerate(masks):
        parents = [j for j, p in enumerate(masks)
                   if j != i and areas[j] > areas[i] and np.logical_and(m, p).sum() >= CONTAINED * areas[i]]
        parents.sort(key=lambda j: areas[j])
        groups.append([m] + [masks[j] for j in parents[:2]])
    return groups


def coco_sampler(images: list[CocoImage], *, prompts_per_image: int = 4):
    """A ``samples(i, rng)`` callable for ``trainer.train``: a random image, random annotation groups."""
    all_groups = [hierarchy_groups(ci.masks) for ci in images]

    def samples(i: int, rng: np.random.Generator) -> Sample:
        k = int(rng.integers(len(images)))
        groups = all_groups[k]
        pick = rng.choice(len(groups), size=min(prompts_per_image, len(groups)), replace=False)
        return Sample(images[k].image, [groups[j] for j in pick], key=images[k].file_name)

    return samples
