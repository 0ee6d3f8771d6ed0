"""Held-out evaluation on generated scenes (``trimask eval``).

For each scene, up to ``clicks_per_scene`` subparts whose part and whole are strictly larger
(subpart ⊊ part ⊊ whole) are clicked once, at the subpart's centre (the pixel farthest from its
boundary). From the three multimask candidates we report:

- best-of-three IoU at each level: max over the candidates of the IoU with that level's mask;
- ranked-first IoU: the candidate with the highest predicted IoU, scored against the level it
  fits best (a click at a subpart has three right answers);
- area order: the fraction of clicks whose candidates 1, 2, 3 come with non-decreasing area.

Then the interactive protocol, for every level of every clicked instance as the target: click 1
at the centre of the target, the candidate ranked first by the IoU head; each next click at the
centre of the largest error region (positive in a false negative, negative in a false positive),
single-mask output with the previous low-res logits as ``mask_input``. mIoU after 1, 3 and 5 clicks.
And a box prompt: the tight bounding box of each level's mask alone, single-mask output, mIoU per level.
Masks are compared at the image's resolution after SAM's postprocessing.

With ``regions=True`` the masks are measured as the browser shows them with its "clicked regions" setting
(the default for ``tiny``): each answer to clicks keeps only its connected regions that hold a positive
click (``keep_clicked_regions``), and the protocol's next click is placed on that mask. The previous low-res
logits go back as ``mask_input`` as the decoder gave them, as the browser sends them.

With ``edges=True`` every answer (clicks and boxes) is first snapped to the image's colour edges as the
browser's "snap edges" setting shows it (the default for ``tiny``; ``trimask.edge_snap``), before the cut.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from trimask.edge_snap import guide_for, snap
from trimask.models.sam import Sam
from trimask.preprocess import get_preprocess_shape, preprocess
from trimask.training.prompt_simulation import center_of_largest_error, noisy_box
from trimask.training.scenes import EVAL_SEED_BASE, LEVELS, Scene, generate_scene
from trimask.training.trainer import IMAGE_FRAME, decode, to_frame

CLICK_COUNTS = (1, 3, 5)


def postprocess(low_res: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """SAM's postprocessing: ``N x K x 256 x 256`` logits -> ``N x K x H x W`` bool at image resolution."""
    h, w = hw
    nh, nw = get_preprocess_shape(h, w, IMAGE_FRAME)
    up = F.interpolate(low_res, size=(IMAGE_FRAME, IMAGE_FRAME), mode="bilinear", align_corners=False)
    up = up[..., :nh, :nw]
    return F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False) > 0


def answer_masks(low_res: torch.Tensor, hw: tuple[int, int], image: np.ndarray | None = None) -> np.ndarray:
    """``N x K x 256 x 256`` logits -> ``N x K x H x W`` bool: SAM's postprocessing, or with ``image``
    (the ``H x W x 3`` picture) each answer snapped to its edges as the browser's "snap edges" setting
    shows it (``trimask.edge_snap.snap``)."""
    if image is None:
        return postprocess(low_res.cpu(), hw).numpy()
    guide = guide_for(image)
    lr = low_res.detach().cpu().numpy()
    return np.stack([[snap(t, image, guide) for t in ans] for ans in lr])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


_EIGHT = np.ones((3, 3), dtype=bool)


def keep_clicked_regions(mask: np.ndarray, points: Iterable[tuple[float, float]]) -> np.ndarray:
    """``mask`` (``H x W`` bool) with only its 8-connected regions that hold one of ``points`` (positive
    clicks, ``(x, y)`` in pixels: pixel ``(floor(y), floor(x))``); unchanged when no point lies on it.
    The browser's ``keepClickedRegions`` (frontend/src/mask_regions.ts) does the same."""
    h, w = mask.shape
    on = [(int(y), int(x)) for x, y in points if 0 <= x < w and 0 <= y < h and mask[int(y), int(x)]]
    if not on:
        return mask
    regions, _ = ndimage.label(mask, structure=_EIGHT)
    return np.isin(regions, [regions[r, c] for r, c in on])


def center_point(mask: np.ndarray) -> tuple[float, float]:
    hit = center_of_largest_error(np.zeros_like(mask), mask)
    assert hit is not None
    return hit[0]


def click_instances(scene: Scene, limit: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Up to ``limit`` (subpart, part, whole) triples with strictly growing areas."""
    out = []
    ids = scene.subpart_ids()
    rng.shuffle(ids)
    for sid in ids:
        sub = scene.subpart_map == sid
        y, x = np.argwhere(sub)[0]
        masks = scene.masks_at(int(y), int(x))
        if masks is None:
            continue
        s, p, w = masks
        if s.sum() < p.sum() < w.sum():
            out.append((s, p, w))
        if len(out) >= limit:
            break
    return out


def clicked_scenes(sam: Sam, scenes: Iterable[Scene], rng: np.random.Generator, limit: int = 2):
    """Each of ``scenes`` that has a subpart to click, as ``trimask eval`` picks them: its up to ``limit``
    (subpart, part, whole) triples, its image size and the embedding of its image."""
    device = next(sam.parameters()).device
    for scene in scenes:
        inst = click_instances(scene, limit, rng)
        if inst:
            yield inst, scene.image.shape[:2], sam.image_encoder(preprocess(scene.image).to(device))


@torch.no_grad()
def evaluate_scene(sam: Sam, scene: Scene, *, clicks_per_scene: int = 2, seed: int = 0,
                   regions: bool = False, edges: bool = False) -> dict[str, list[float]]:
    """Per-click measurements on one scene (lists, to be averaged over scenes); ``regions``: the answers to
    clicks as the browser's "clicked regions" setting shows them (``keep_clicked_regions``); ``edges``: every
    answer snapped to the image's edges as the browser's "snap edges" setting shows it (``answer_masks``)."""
    rng = np.random.default_rng(seed)
    inst = click_instances(scene, clicks_per_scene, rng)
    res: dict[str, list[float]] = {k: [] for k in _metric_names()}
    if not inst:
        return res
    hw = scene.image.shape[:2]
    emb = sam.image_encoder(preprocess(scene.image))
    # Single click at each subpart's centre: the three candidates.
    clicks = [center_point(s) for s, _, _ in inst]
    pts = torch.tensor(np.stack([to_frame(np.array([c]), hw) for c in clicks]), dtype=torch.float32)
    lbl = torch.ones(len(inst), 1)
    logits, iou_pred = decode(sam, emb, pts, lbl, None, None, True)
    image = scene.image if edges else None
    cands = answer_masks(logits, hw, image)
    if regions:
        cands = np.stack([[keep_clicked_regions(m, [c]) for m in cs] for cs, c in zip(cands, clicks)])
    for n, levels in enumerate(inst):
        ious = np.array([[_iou(cands[n, k], levels[lv]) for lv in range(3)] for k in range(3)])  # cand x level
        for lv, name in enumerate(LEVELS):
            res[f"best_of_3_{name}"].append(float(ious[:, lv].max()))
        top = int(iou_pred[n].argmax())
        res["ranked_first"].append(float(ious[top].max()))
        areas = cands[n].reshape(3, -1).sum(1)
        res["area_ordered"].append(float(areas[0] <= areas[1] <= areas[2]))
    # Interactive protocol for every level of every instance.
    targets = [levels[lv] for levels in inst for lv in range(3)]
    for j, m in enumerate(box_answers(sam, emb, hw, targets, rng, image)):
        res[f"box_{LEVELS[j % 3]}"].append(_iou(m, targets[j]))
    first = first_answers(sam, emb, hw, targets)
    for click, masks in enumerate(click_answers(sam, emb, hw, targets, first, regions=regions, image=image), 1):
        if click in CLICK_COUNTS:
            res[f"miou_{click}_clicks"].extend(_iou(m, t) for t, m in zip(targets, masks))
    return res


def box_answers(sam: Sam, emb: torch.Tensor, hw: tuple[int, int], targets: list[np.ndarray],
                rng: np.random.Generator, image: np.ndarray | None = None) -> np.ndarray:
    """A tight box around each target, alone: the single-mask answers (``N x H x W`` bool); with ``image``
    snapped to its edges (``answer_masks``)."""
    boxes = torch.tensor(np.stack([to_frame(noisy_box(t, rng, noise=0.0).reshape(2, 2), hw).reshape(4) for t in targets]),
                         dtype=torch.float32, device=emb.device)
    return answer_masks(decode(sam, emb, None, None, boxes, None, False)[0], hw, image)[:, 0]


def first_answers(sam: Sam, emb: torch.Tensor, hw: tuple[int, int], targets: list[np.ndarray]) -> torch.Tensor:
    """The protocol's first click, at each target's centre: the logits of the candidate the IoU head
    ranks first (``N x 1 x 256 x 256``)."""
    pts = torch.tensor(np.stack([to_frame(np.array([center_point(t)]), hw) for t in targets]),
                       dtype=torch.float32, device=emb.device)
    logits, iou_pred = decode(sam, emb, pts, torch.ones(len(targets), 1, device=emb.device), None, None, True)
    return logits[torch.arange(len(targets)), iou_pred.argmax(1)][:, None]


Answer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def click_answers(sam: Sam, emb: torch.Tensor, hw: tuple[int, int], targets: list[np.ndarray], first: torch.Tensor,
                  clicks: int = max(CLICK_COUNTS), answer: Answer | None = None, regions: bool = False,
                  image: np.ndarray | None = None) -> list[np.ndarray]:
    """The standard protocol from the ``first`` answers (``first_answers``): each next click at the
    centre of the largest error region, single-mask output with the previous logits as the mask input.
    Returns the masks after each of ``clicks`` clicks (``N x H x W`` bool each; the first is ``first``'s).
    ``answer(click, points, labels, previous logits)`` gives a click's logits in place of the decoder.
    ``regions``: each mask keeps only its regions that hold a positive click (``keep_clicked_regions``);
    ``image``: each answer snapped to its edges first (``answer_masks``)."""
    if answer is None:
        answer = lambda click, pt, lb, prev: decode(sam, emb, pt, lb, None, prev, False)[0]  # noqa: E731
    points: list[list[tuple[float, float]]] = [[center_point(t)] for t in targets]
    labels: list[list[int]] = [[1] for _ in targets]
    prev, out = first, []
    for click in range(1, clicks + 1):
        if click > 1:
            pt = torch.tensor(np.stack([to_frame(np.array(p), hw) for p in points]), dtype=torch.float32, device=emb.device)
            lb = torch.tensor(labels, dtype=torch.float32, device=emb.device)
            prev = answer(click, pt, lb, prev)
        masks = answer_masks(prev, hw, image)[:, 0]
        if regions:
            masks = np.stack([keep_clicked_regions(m, [p for p, lb in zip(pi, li) if lb == 1])
                              for m, pi, li in zip(masks, points, labels)])
        out.append(masks)
        if click == clicks:
            break
        for i, (t, m) in enumerate(zip(targets, masks)):
            nxt = center_of_largest_error(m, t)
            if nxt is None:  # exact already: repeat the last click (keeps the batch rectangular)
                nxt = (points[i][-1], labels[i][-1])
            points[i].append(nxt[0])
            labels[i].append(nxt[1])
    return out


def _metric_names() -> list[str]:
    return ([f"best_of_3_{n}" for n in LEVELS] + ["ranked_first", "area_ordered"]
            + [f"miou_{c}_clicks" for c in CLICK_COUNTS] + [f"box_{n}" for n in LEVELS])


def evaluate(
    sam: Sam,
    *,
    scenes: int = 50,
    seed: int = 0,
    clicks_per_scene: int = 2,
    progress: Callable[[int], None] | None = None,
    regions: bool = False,
    edges: bool = False,
) -> dict[str, float]:
    """Mean metrics over ``scenes`` held-out scenes (seeds EVAL_SEED_BASE + seed * 100000 + i), each in [0, 1];
    ``regions``: the answers to clicks as the browser's "clicked regions" setting shows them; ``edges``: every
    answer snapped to the image's edges as the browser's "snap edges" setting shows it.

    Also returns ``clicks`` (the number of clicked instances) and ``scenes``.
    """
    sam.eval()
    acc: dict[str, list[float]] = {k: [] for k in _metric_names()}
    for i in range(scenes):
        scene_seed = EVAL_SEED_BASE + seed * 100_000 + i
        r = evaluate_scene(sam, generate_scene(scene_seed), clicks_per_scene=clicks_per_scene, seed=scene_seed,
                           regions=regions, edges=edges)
        for k, v in r.items():
            acc[k].extend(v)
        if progress:
            progress(1)
    out = {k: (float(np.mean(v)) if v else float("nan")) for k, v in acc.items()}
    out["clicks"] = len(acc["ranked_first"])
    out["scenes"] = scenes
    return out


def default_regions(model: str) -> str:
    """The browser's default for the "clicked regions" setting with ``model`` (frontend/src/settings.ts):
    ``clicked`` for the embedded tiny model, whose codes also match look-alike regions elsewhere in the
    image, ``all`` for official checkpoints, whose answers may rightly hold several regions (an object
    split by an occluder)."""
    return "clicked" if model == "tiny" else "all"


def default_edges(model: str) -> str:
    """The browser's default for the "snap edges" setting with ``model`` (frontend/src/settings.ts): ``snap``
    for the embedded tiny model, whose answers mark 4 x 4-pixel cells of the decoder's 256 frame, ``off``
    for official checkpoints."""
    return "snap" if model == "tiny" else "off"


def format_metrics(m: dict[str, float]) -> str:
    """A small table of the metrics for the terminal and the model card."""
    rows = [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()]
    return "| metric | value |\n| --- | --- |\n" + "\n".join(rows)


def run_eval_command(args: argparse.Namespace) -> int:
    """``trimask eval``: build the model, evaluate with a progress bar, print the table."""
    from tqdm import tqdm

    from trimask.errors import TrimaskError
    from trimask.models.build import build_sam

    if args.scenes < 1:
        raise TrimaskError("--scenes must be at least 1.")
    regions = args.regions or default_regions(args.model)
    edges = args.edges or default_edges(args.model)
    sam = build_sam(args.model, args.checkpoint)
    with tqdm(total=args.scenes, desc="eval", unit="scene", file=sys.stderr) as bar:
        metrics: dict = evaluate(sam, scenes=args.scenes, seed=args.seed, progress=bar.update,
                                 regions=regions == "clicked", edges=edges == "snap")
    metrics["regions"] = regions
    metrics["edges"] = edges
    print(format_metrics(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
