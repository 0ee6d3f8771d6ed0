"""Pre-training the tiny encoder to write region codes for the code-match decoder start.

``trimask.training.decoder_start`` lays SAM's decoder out to answer a click by comparing, per level,
a 16-channel code at every cell with the code under the click. This module trains the image
encoder to write such codes on generated scenes: for random anchor cells on objects and every cell
of the 64 x 64 grid, the dot product of their level-l codes is pushed above ``MATCH`` when both lie
in the same subpart / part / whole and below it otherwise (a logistic loss on the dot product;
for every anchor the means over its positives, over its negatives and, for subparts and parts,
over its hard negatives, the other regions of its part or whole, weigh the same, and every anchor
weighs the same). Half the anchors are drawn region by region, so a subpart of a dozen cells counts
as much as a part of a thousand. A dense, per-cell signal: it trains in minutes where the
decoder's objectives need hours to find the same structure.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trimask.models.tiny_encoder import to_work_size
from trimask.preprocess import preprocess
from trimask.training.decoder_start import CODE, CODE_CHANNELS, CODE_DIM, OBJ, OBJECT_VALUE
from trimask.training.scenes import Scene

MATCH = 8.0  # dot products of one region's codes aim above this (codes of norm ~4), others below
MATCH_WIDTH = 2.0
GRID = 64


def cell_labels(scene: Scene, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Region ids at the cell centres: ``3 x grid*grid`` (subpart, part, whole) and the object mask.

    The grid covers the padded square frame that ``trimask.preprocess`` makes of the image (long side
    first, padding at the bottom/right): cells in the padding are background. A cell in a part without
    subparts gets that part as its subpart (the smallest region there).
    """
    h, w = scene.part_map.shape
    centres = ((np.arange(grid) + 0.5) * max(h, w) / grid).astype(int)
    rows, cols = centres[centres < h], centres[centres < w]

    def sample(label_map: np.ndarray) -> np.ndarray:
        out = np.zeros((grid, grid), np.int64)
        out[: len(rows), : len(cols)] = label_map[np.ix_(rows, cols)]
        return out

    part, sub, whole = sample(scene.part_map), sample(scene.subpart_map), sample(scene.whole_map)
    sub = np.where(sub > 0, sub, part + int(scene.subpart_map.max()) + 1)
    return np.stack([sub.ravel(), part.ravel(), whole.ravel()]), whole.ravel() > 0


def _anchors(regions: np.ndarray, cells: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` distinct cells of ``cells``: half by cell, half by region (``regions`` holds each cell's
    smallest region; a region is drawn uniformly, then a cell in it)."""
    _, inverse, sizes = np.unique(regions, return_inverse=True, return_counts=True)
    weight = 0.5 / len(cells) + 0.5 / (len(sizes) * sizes[inverse])
    return rng.choice(cells, size=min(count, len(cells)), replace=False, p=weight / weight.sum())


def region_code_loss(embedding: torch.Tensor, scene: Scene, rng: np.random.Generator,
                     anchors: int = 256, dims: int = CODE_DIM) -> tuple[torch.Tensor, dict[str, float]]:
    """The pull/push loss on one scene's ``1 x 256 x 64 x 64`` embedding; returns (loss, stats).

    ``dims``: how many of each level's code channels the dot products span (the first ones). The laid-out
    decoder's comparison heads read 15 of the 16 (``decoder_start.COMPARED``); the code pre-training used 16.

    Also objectness (channel ``OBJ``): the squared error against OBJECT_VALUE on objects and 0
    elsewhere, over OBJECT_VALUE ** 2, which the start's box prompt reads.
    """
    labels, on_object = cell_labels(scene, embedding.shape[-1])
    cells = np.flatnonzero(on_object)
    if len(cells) == 0:
        return embedding.sum() * 0.0, {}
    pick = _anchors(labels[0][cells], cells, rng, anchors)
    target = OBJECT_VALUE * torch.from_numpy(on_object).to(embedding)
    total = (embedding[0, OBJ].flatten() - target).square().mean() / OBJECT_VALUE**2
    stats: dict[str, float] = {"objectness": float(total.detach())}
    for lv, name in enumerate(("subpart", "part", "whole")):
        codes = embedding[0, list(CODE[lv][:dims])].flatten(1)  # dims x cells
        dots = codes[:, pick].T @ codes  # anchors x cells
        per_anchor, gap = _anchor_terms(dots, labels[lv], labels[lv + 1] if lv < 2 else None, pick)
        total = total + per_anchor.mean()
        stats[f"gap_{name}"] = gap
    return total, stats


def _anchor_terms(dots: torch.Tensor, region: np.ndarray, parent: np.ndarray | None,
                  pick: np.ndarray) -> tuple[torch.Tensor, float]:
    """Each anchor's loss at one level from its ``anchors x cells`` dot products, and the mean dot
    product gap (same region minus the rest).

    The logistic loss of logit z against a label y is softplus(z) - y z, so its sum over any set of
    cells is a sum of softplus(z) and of z over that set: summed per region with one matrix product,
    the positives (the anchor's region), the negatives (the rest) and the hard negatives (the other
    regions of the anchor's parent; regions nest, so they are the parent minus the region) cost no
    per-pair masks. Anchors lie on objects, so background cells are always negatives.
    """
    ids, inverse, counts = np.unique(region, return_inverse=True, return_counts=True)
    onehot = F.one_hot(torch.from_numpy(inverse), len(ids)).to(dots)  # cells x regions
    own = torch.from_numpy(inverse[pick])[:, None].to(dots.device)
    logits = (dots - MATCH) / MATCH_WIDTH
    soft = F.softplus(logits)
    soft_own = (soft @ onehot).gather(1, own)[:, 0]
    dots_own = (dots @ onehot).gather(1, own)[:, 0]
    n_pos = torch.from_numpy(counts[inverse[pick]]).to(dots)
    n_neg = dots.shape[1] - n_pos
    logit_own = (dots_own - MATCH * n_pos) / MATCH_WIDTH
    per_anchor = (soft_own - logit_own) / n_pos + (soft.sum(1) - soft_own) / n_neg.clamp(min=1)
    if parent is not None:
        p_ids, p_inverse, p_counts = np.unique(parent, return_inverse=True, return_counts=True)
        p_onehot = F.one_hot(torch.from_numpy(p_inverse), len(p_ids)).to(dots)
        soft_parent = (soft @ p_onehot).gather(1, torch.from_numpy(p_inverse[pick])[:, None].to(dots.device))[:, 0]
        n_near = torch.from_numpy(p_counts[p_inverse[pick]]).to(dots) - n_pos
        per_anchor = per_anchor + (soft_parent - soft_own) / n_near.clamp(min=1)
    d = dots.detach()
    same_sum, same_n = float(dots_own.detach().sum()), float(n_pos.sum())
    gap = same_sum / same_n - (float(d.sum()) - same_sum) / max(1.0, d.numel() - same_n)
    return per_anchor, gap


def prepare_encoder(encoder: torch.nn.Module) -> None:
    """Silence the tiny encoder's channels outside the codes and objectness (its last LayerNorm's scale
    and shift to 0).

    Their weights then get no gradient from the code loss and stay at 0; SAM's objectives may use them later.
    """
    norm = encoder.neck[-1]
    other = [c for c in range(norm.weight.shape[0]) if c not in {*CODE_CHANNELS, OBJ}]
    with torch.no_grad():
        norm.weight[other] = 0.0
        norm.bias.zero_()


class _SceneInputs(torch.utils.data.Dataset):
    """Scene ``i`` and the encoder's input for it, at the encoder's ``work_size`` when it has one (the
    tiny encoder looks at a 256 px copy of its 1024 input): a worker then hands over the small copy."""

    def __init__(self, scenes: Callable[[int], Scene], count: int, work_size: int | None) -> None:
        self.scenes, self.count, self.work_size = scenes, count, work_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Scene]:
        scene = self.scenes(i)
        x = preprocess(scene.image)
        if self.work_size:
            x = to_work_size(x, self.work_size)
        return x[0], scene


def _collate(items: list[tuple[torch.Tensor, Scene]]) -> tuple[torch.Tensor, list[Scene]]:
    return torch.stack([x for x, _ in items]), [scene for _, scene in items]


def scheduled_batches(opt: torch.optim.Optimizer, lr: float, scenes: Callable[[int], Scene], encoder: torch.nn.Module,
                      *, steps: int, batch: int, workers: int, max_seconds: float | None):
    """The steps of a pre-training stage: yields (step, input batch on the encoder's device, scenes), ``batch``
    scenes a step made in order by ``workers`` processes (0: this one), with ``opt``'s rate set for the
    step: 50 warm-up steps, then cosine decay to 5 % of ``lr`` over the steps or over ``max_seconds``
    when given, whichever ends first."""
    device = next(encoder.parameters()).device
    loader = torch.utils.data.DataLoader(
        _SceneInputs(scenes, steps * batch, getattr(encoder, "work_size", None)), batch_size=batch, collate_fn=_collate,
        num_workers=workers, prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
    batches = iter(loader)
    start = time.time()
    try:
        for step in range(steps):
            frac = step / steps
            if max_seconds is not None:
                frac = max(frac, (time.time() - start) / max_seconds)
            if frac >= 1.0:
                return
            warm = min(1.0, (step + 1) / 50)
            for group in opt.param_groups:
                group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            x, batch_scenes = next(batches)
            yield step, x.to(device, non_blocking=True), batch_scenes
    finally:
        del batches  # stops the workers


def clipped_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, ema: float | None) -> float:
    """One optimizer step on ``loss`` (gradient norm clipped at 1); returns the loss's moving average (0.95)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    value = float(loss.detach())
    return value if ema is None else 0.95 * ema + 0.05 * value


def pretrain_codes(
    encoder: torch.nn.Module,
    scenes: Callable[[int], Scene],
    *,
    steps: int,
    seed: int = 0,
    lr: float = 2e-3,
    batch: int = 1,
    workers: int = 0,
    max_seconds: float | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train ``encoder`` (in place, on its device) on ``scenes(i)``, ``batch`` scenes per step (the mean of
    their losses), made in order by ``workers`` processes (0: this one; ``scenes`` must then survive a
    fork). The anchors are drawn here, in scene order, so the run does not depend on ``workers``.

    AdamW with 50 warm-up steps and cosine decay to 5 % over the steps (or over ``max_seconds`` when
    given, whichever ends first). Returns steps and scenes done, seconds and the smoothed loss.
    """
    if batch < 1 or workers < 0:
        raise ValueError("batch must be 1 or more and workers 0 or more")
    rng = np.random.default_rng(seed)
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)
    encoder.train()
    start = time.time()
    ema = None
    done = 0
    for step, x, batch_scenes in scheduled_batches(opt, lr, scenes, encoder, steps=steps, batch=batch, workers=workers,
                                                   max_seconds=max_seconds):
        embedding = encoder(x)
        losses, stats = [], {}
        for b, scene in enumerate(batch_scenes):
            scene_loss, scene_stats = region_code_loss(embedding[b : b + 1], scene, rng)
            losses.append(scene_loss)
            for k, v in scene_stats.items():
                stats.setdefault(k, []).append(v)
        ema = clipped_step(opt, params, torch.stack(losses).mean(), ema)
        done = step + 1
        if progress:
            progress(1)
        if step % 20 == 0:
            log(f"codes step {step} t={time.time() - start:.0f}s loss={ema:.3f} "
                + " ".join(f"{k}={np.mean(v):.1f}" for k, v in stats.items()))
    encoder.eval()
    return {"steps": done, "scenes": done * batch, "batch": batch, "seconds": time.time() - start, "loss": ema}
