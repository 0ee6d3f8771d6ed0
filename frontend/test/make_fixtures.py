"""Writes fixtures/reference.json: torch's bilinear numerics, SAM's mask postprocessing,
pycocotools' RLE strings and ``trimask eval``'s clicked regions and snapped edges, for the Vitest suite
to compare the browser code against.

Run once with the project's venv (needs torch, numpy, pycocotools):
    .venv/bin/python frontend/test/make_fixtures.py
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from trimask.edge_snap import area_resize, guide_for, snap
from trimask.training.evaluate import keep_clicked_regions
from trimask.training.scenes import generate_scene


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def preprocess_shape(h: int, w: int, long_side: int = 1024) -> tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_postprocess(low_res: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """SAM's Sam.postprocess_masks for one 256x256 logit map, thresholded at 0."""
    t = torch.from_numpy(low_res)[None, None]
    t = F.interpolate(t, (1024, 1024), mode="bilinear", align_corners=False)
    nh, nw = preprocess_shape(*orig_hw)
    t = t[..., :nh, :nw]
    t = F.interpolate(t, orig_hw, mode="bilinear", align_corners=False)
    return (t[0, 0] > 0).numpy()


def blobs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """A smooth logit-like field: sum of Gaussian bumps minus a threshold."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = np.full((h, w), -1.0, np.float32)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.05, 0.2) * max(h, w)
        f += rng.uniform(1.0, 3.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return (f * 8).astype(np.float32)


def rle_string(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def _regions_case(mask: np.ndarray, points: list[tuple[float, float]]) -> dict:
    kept = keep_clicked_regions(mask, points)
    return {
        "h": mask.shape[0], "w": mask.shape[1], "points": points,
        "bits": b64(np.packbits(mask.astype(np.uint8).ravel())),
        "kept": b64(np.packbits(kept.astype(np.uint8).ravel())), "area": int(kept.sum()),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    out: dict = {}

    src = rng.standard_normal((7, 5)).astype(np.float32)
    resized = []
    for oh, ow in [(13, 11), (3, 4), (7, 5), (16, 2)]:
        r = F.interpolate(torch.from_numpy(src)[None, None], (oh, ow), mode="bilinear", align_corners=False)
        resized.append({"h": oh, "w": ow, "values": b64(r[0, 0].numpy())})
    out["bilinear"] = {"h": 7, "w": 5, "src": b64(src), "resized": resized}

    low_res = blobs(rng, 256, 256, 6)
    post = []
    for hw in [(37, 53), (300, 200), (480, 640), (1536, 1024)]:
        m = sam_postprocess(low_res, hw)
        post.append({"h": hw[0], "w": hw[1], "counts": rle_string(m), "area": int(m.sum())})
    out["postprocess"] = {"low_res": b64(low_res), "cases": post}

    masks = []
    cases = {
        "empty": np.zeros((4, 6), bool),
        "full": np.ones((5, 3), bool),
        "one_pixel": np.pad(np.ones((1, 1), bool), ((2, 1), (3, 0))),
        "blobs": blobs(rng, 97, 131, 5) > 0,
        "big_runs": np.pad(np.ones((900, 700), bool), ((50, 50), (100, 0))),
        "noise": rng.random((40, 33)) > 0.5,
    }
    for name, m in cases.items():
        masks.append({
            "name": name, "h": m.shape[0], "w": m.shape[1],
            "bits": b64(np.packbits(m.astype(np.uint8).ravel())),  # row-major
            "counts": rle_string(m), "area": int(m.sum()),
        })
    out["rle"] = masks

    # Clicked regions (own generator, so the cases above stay as they were): masks of many regions,
    # points on them, beside them and off the image; the mask trimask eval measures.
    rng = np.random.default_rng(1)
    regions = []
    for h, w, density in [(40, 60, 0.3), (64, 48, 0.38), (33, 71, 0.35)]:
        m = rng.random((h, w)) < density
        on = np.argwhere(m)
        for k in (1, 2, 3):
            picks = on[rng.choice(len(on), k, replace=False)]
            pts = [(float(c) + rng.uniform(0, 0.99), float(r) + rng.uniform(0, 0.99)) for r, c in picks]
            regions.append(_regions_case(m, pts))
        off = np.argwhere(~m)[0]
        regions.append(_regions_case(m, [(float(off[1]) + 0.5, float(off[0]) + 0.5), (-3.0, 2.0), (w + 1.0, 0.0)]))
    out["regions"] = regions

    # Snapped edges: a crop of a generated scene (not square, so the guide covers part of the 256 frame)
    # and the postprocessing's logits above, snapped at full resolution and at the display's size.
    image = np.ascontiguousarray(generate_scene(12345).image[40:190, 20:220])
    h, w = image.shape[:2]
    dh, dw = preprocess_shape(h, w, 512)
    guide = guide_for(image)
    full = snap(low_res, image, guide)
    display = snap(low_res, area_resize(image, dh, dw), guide, out_hw=(dh, dw))
    out["snap"] = {
        "h": h, "w": w, "image": b64(image),
        "full": b64(np.packbits(full.ravel())), "full_area": int(full.sum()),
        "dh": dh, "dw": dw, "display": b64(np.packbits(display.ravel())), "display_area": int(display.sum()),
        "unsnapped_area": int(sam_postprocess(low_res, (h, w)).sum()),
    }

    path = Path(__file__).parent / "fixtures" / "reference.json"
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
