"""What the tiny model answers to clicks on the bundled sample photos (no ground truth there).

The generated scenes have masks to score against (``trimask eval``); the photos that
``trimask samples`` writes (scikit-image's) do not, so this counts what an annotator
would meet: on each photo, 25 clicks on a 5 x 5 grid (10 % to 90 % of each side), the
three candidates decoded in PyTorch and upsampled to the image as SAM does. Reported per
checkpoint: clicks whose three candidates are all empty, clicks whose preselected
candidate (the IoU head's first) is empty, clicks that the preselected candidate
contains, and its median size as a share of the image. ``--edges snap`` measures the candidates
snapped to the photo's edges, as the browser shows them with its "snap edges" setting
(``trimask.edge_snap``).

    .venv/bin/python bench/photo_clicks.py [--checkpoint FILE ...] [--edges snap|off] [--threads 2]

Without ``--checkpoint``, the bundled tiny weights. Prints a markdown table.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from trimask.commands.samples import SKIMAGE_PHOTOS
from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.evaluate import answer_masks
from trimask.training.trainer import decode, to_frame

GRID = np.linspace(0.1, 0.9, 5)


def photos() -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)())[..., :3] for name in SKIMAGE_PHOTOS]


@torch.no_grad()
def count(sam, images: list[np.ndarray], edges: bool = False) -> dict[str, float]:
    """The grid's clicks on each image, decoded together (one prompt each); ``edges``: snapped."""
    all_empty = top_empty = contains = 0
    sizes = []
    for image in images:
        hw = image.shape[:2]
        embedding = sam.image_encoder(preprocess(image))
        clicks = [(fx * (hw[1] - 1), fy * (hw[0] - 1)) for fy in GRID for fx in GRID]
        points = torch.tensor(np.stack([to_frame(np.array([c]), hw) for c in clicks]), dtype=torch.float32)
        logits, iou = decode(sam, embedding, points, torch.ones(len(clicks), 1), None, None, True)
        masks = answer_masks(logits, hw, image if edges else None)  # clicks x 3 x H x W
        areas = masks.reshape(len(clicks), 3, -1).sum(2)
        top = iou.argmax(1).numpy()
        for n, (x, y) in enumerate(clicks):
            all_empty += int((areas[n] == 0).all())
            top_empty += int(areas[n, top[n]] == 0)
            contains += int(masks[n, top[n], int(round(y)), int(round(x))])
            sizes.append(areas[n, top[n]] / masks[n, 0].size)
    return {"clicks": len(sizes), "all_empty": all_empty, "top_empty": top_empty, "contains": contains,
            "median_size": float(np.median(sizes))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", default=None, help="tiny weights (repeat to compare)")
    p.add_argument("--edges", choices=("snap", "off"), default="off", help="candidates snapped to the photo's edges")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = photos()
    print("| tiny weights | clicks | all three empty | preselected empty | preselected contains the click "
          "| preselected median size |")
    print("| --- | --: | --: | --: | --: | --: |")
    for ckpt in args.checkpoint or [None]:
        c = count(build_sam("tiny", ckpt).eval(), images, args.edges == "snap")
        print(f"| {ckpt or 'bundled'} | {c['clicks']} | {c['all_empty']} | {c['top_empty']} | {c['contains']} "
              f"| {100 * c['median_size']:.1f} % |")


if __name__ == "__main__":
    main()
