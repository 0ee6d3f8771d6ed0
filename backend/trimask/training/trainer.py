"""Training loop for SAM-architecture models with SAM's objectives and simulated interaction.

One step: a batch of images goes through the image encoder; for each image a
few prompts are simulated. Round 1 is either a single point (ambiguous: the
three multimask candidates are matched to the valid targets under the click,
e.g. subpart/part/whole, see ``losses.matched_candidates_loss``) or a noisy box
around one target (single-mask token). Each later round adds a click sampled
from the error region of the previous prediction, feeds the previous low-res
logits as ``mask_input`` and trains the single-mask token. The IoU head
regresses actual IoUs throughout. The same loop trains the embedded ``tiny``
model on generated scenes and fine-tunes any model on COCO annotations.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trimask.models.sam import Sam
from trimask.preprocess import get_preprocess_shape, preprocess
from trimask.training import losses
from trimask.training.code_pretrain import region_code_loss
from trimask.training.prompt_simulation import noisy_box, sample_error_click, sample_point_in
from trimask.training.scenes import Scene

LOW_RES = 256
IMAGE_FRAME = 1024


@dataclass
class TrainConfig:
    """What a training run does; stored in the checkpoint so the run can be reproduced."""

    seed: int = 0
    steps: int = 1500
    images_per_step: int = 1
    prompts_per_image: int = 3
    rounds: int = 2
    lr: float = 1e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    box_start_prob: float = 0.35
    iou_loss_weight: float = 1.0
    train_encoder: bool = True
    save_every: int = 100
    # Progressive resolution (tiny encoder only): the first coarse_steps run the encoder on a
    # 128 px copy and the decoder on a 32 x 32 grid (4x cheaper), the rest at the real 64 x 64.
    coarse_steps: int = 0
    # Curriculum for training from scratch: the focal weight rises from 0 to SAM's 20 between these
    # fractions of the run (dice alone first). Focal's calibration keeps an untrained decoder's
    # probabilities under 0.5 everywhere, so without it the masks stay empty for thousands of steps.
    # (0, 0): SAM's objective throughout (fine-tuning a trained model).
    focal_ramp: tuple[float, float] = (0.0, 0.0)
    # The focal term's weight against dice (SAM: 20). Lower only to train a model from scratch on a
    # small budget; the model card says so when a shipped model used another value.
    focal_weight: float = losses.FOCAL_WEIGHT
    # Curriculum over target levels for training from scratch: before the first fraction of the run
    # every click's only target is its whole (SAM's min-over-3 rule for a single mask), before the
    # second the subpart level is replaced by the part, then the full subpart/part/whole hierarchy.
    # Large targets first: under 20x focal an untrained model answering a mix dominated by small
    # subparts settles on empty masks and never escapes; wholes pull it out within ~100 steps.
    # (0, 0): the full hierarchy throughout.
    level_curriculum: tuple[float, float] = (0.0, 0.0)
    # Window training: from the end of the coarse steps up to window_steps the decoder of each
    # prompt sees only a window_cells x window_cells window of the full-resolution embedding (with
    # the matching window of the positional encoding) that holds the prompt's whole: the real
    # resolution at the cost of the coarse grid (the decoder's cost grows with its image tokens).
    window_cells: int = 0
    window_steps: int = 0
    # Parameters whose names start with one of these stay as they are (e.g. a built decoder start
    # while the encoder learns to feed it: "mask_decoder.transformer.").
    frozen: tuple[str, ...] = ()
    # Weight of the region-code loss (``code_pretrain.region_code_loss``) on the encoder's embedding,
    # added to SAM's objectives for samples made from generated scenes at the 64 x 64 grid. It keeps
    # the codes of a code-match start apart while SAM's loss trains (0: SAM's objectives alone).
    code_loss_weight: float = 0.0
    # Train multimask candidate k on level k of a full hierarchy (subpart, part, whole) instead of SAM's
    # least-loss assignment: for the code-match layout, whose tokens read one level each.
    fixed_levels: bool = False
    # The mask losses see the logits times this (the IoU head's target, the sign, is unchanged). 1: SAM's. The
    # code-match layout's logits are soft, so a small region's soft dice stays near 1 whatever its IoU unless
    # they are sharpened (``code_path.CodePathConfig.logit_scale``).
    logit_scale: float = 1.0


@dataclass
class Sample:
    """One training image with click groups.

    image: ``H x W x 3`` uint8. groups: each a list of nested bool ``H x W`` masks, smallest first
    (e.g. [subpart, part, whole]); a first click is placed in the smallest mask, and every mask of
    the group is a valid answer to it.
    """

    image: np.ndarray
    groups: list[list[np.ndarray]]
    key: str | None = None  # identifies the image: embeddings are cached by it when the encoder is frozen
    scene: Scene | None = None  # the generated scene it was made from (its label maps), if any


def levels_at(frac: float, cfg: TrainConfig) -> int:
    """How many hierarchy levels the curriculum trains at ``frac`` of the run: 1, 2 or 3."""
    whole_until, part_until = cfg.level_curriculum
    return 1 if frac < whole_until else 2 if frac < part_until else 3


def restrict_levels(groups: list[list[np.ndarray]], levels: int) -> list[list[np.ndarray]]:
    """Click groups cut to the curriculum's levels: 1 -> [whole]; 2 -> [part, part, whole]; 3 -> as given.

    Groups with fewer than three masks (e.g. single COCO masks) are left as they are.
    """
    if levels >= 3:
        return groups
    out = []
    for g in groups:
        if len(g) < 3:
            out.append(g)
        elif levels == 1:
            out.append([g[-1]])
        else:
            out.append([g[-2], g[-2], g[-1]])
    return out


def scene_to_sample(scene: Scene, rng: np.random.Generator, *, n_groups: int = 3, subpart_prob: float = 0.5) -> Sample:
    """Click groups (subpart|part, part, whole) at random points of a generated scene."""
    groups: list[list[np.ndarray]] = []
    sub_ids = scene.subpart_ids()
    wholes = [int(w) for w in np.unique(scene.whole_map) if w]
    for _ in range(n_groups):
        if sub_ids and rng.uniform() < subpart_prob:
            sid = sub_ids[int(rng.integers(len(sub_ids)))]
            x, y = sample_point_in(scene.subpart_map == sid, rng)
        elif wholes:
            w = wholes[int(rng.integers(len(wholes)))]
            x, y = sample_point_in(scene.whole_map == w, rng)
        else:
            continue
        sub, part, whole = scene.masks_at(int(y), int(x))
        groups.append([sub, part, whole])
    return Sample(scene.image, groups, scene=scene)


def to_frame(xy: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Pixel positions (x, y) of an ``H x W`` image (pixel centres) -> coordinates in the 1024 frame."""
    h, w = size_hw
    scale = IMAGE_FRAME / max(h, w)
    return (np.asarray(xy, np.float64) + 0.5) * scale


def low_res_target(mask: np.ndarray, size: int = LOW_RES) -> np.ndarray:
    """An ``H x W`` bool mask -> ``size x size`` bool in the decoder's padded low-res frame."""
    h, w = mask.shape
    nh, nw = get_preprocess_shape(h, w, size)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)[0, 0] > 0.5
    out = np.zeros((size, size), bool)
    out[:nh, :nw] = t.numpy()
    return out


def decode(
    sam: Sam,
    embedding: torch.Tensor,
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
    image_pe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run prompt encoder + mask decoder for N prompts on one image.

    embedding ``1 x 256 x 64 x 64``; points ``N x n x 2`` (1024 frame), labels ``N x n``;
    boxes ``N x 4`` (1024 frame); mask_input ``N x 1 x 256 x 256`` logits.
    Returns low-res logits ``N x K x 256 x 256`` and IoU predictions ``N x K`` (K = 3 or 1).
    With ``image_pe`` (window training) embedding and image_pe are ``N x 256 x w x w`` windows,
    one per prompt, and the logits and mask_input cover the windows (``4w x 4w``).
    """
    pts = (points, labels) if points is not None else None
    sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=mask_input)
    per_prompt = image_pe is not None
    if image_pe is None:
        # The positional encoding is continuous in normalized coordinates, so a coarser grid
        # (progressive-resolution training) sees a subsampled version of the same encoding.
        image_pe = sam.prompt_encoder.pe_layer(tuple(embedding.shape[-2:])).unsqueeze(0)
    return sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        per_prompt_images=per_prompt,
    )


def window_origins(targets: np.ndarray, cells: int, grid: int, rng: np.random.Generator) -> np.ndarray:
    """Random window positions (``N x 2``: row, column in embedding cells) for window training.

    targets: ``N x 3 x 4g x 4g`` low-res masks of each prompt, smallest first. Each window of
    ``cells x cells`` lies in the ``grid x grid`` embedding and holds the bounding box of the
    prompt's whole or, when the whole is larger than the window, of its smallest target (the
    first click's), which a window too small for even that is centred on.
    """
    def span(m: np.ndarray, axis: int) -> tuple[int, int]:  # first and last occupied cell along axis
        idx = np.flatnonzero(m.any(axis=1 - axis)) // 4
        return (int(idx[0]), int(idx[-1])) if len(idx) else (0, grid - 1)

    out = np.zeros((len(targets), 2), np.int64)
    for i, t in enumerate(targets):
        for axis in (0, 1):
            first, last = span(t[-1], axis)
            if last - first >= cells:  # the whole does not fit: hold the first click's target
                first, last = span(t[0], axis)
            lo, hi = max(0, last - cells + 1), min(first, grid - cells)
            if lo > hi:  # not even that fits: centre on it
                lo = hi = min(max(0, (first + last + 1) // 2 - cells // 2), grid - cells)
            out[i, axis] = rng.integers(lo, hi + 1)
    return out


def _pad3(group: list[np.ndarray]) -> list[np.ndarray]:
    """A group of 1..3 nested masks -> exactly 3, smallest first (a missing level repeats the next larger)."""
    g = list(group)[-3:]
    while len(g) < 3:
        g.insert(0, g[0])
    return g


def _group_targets(groups: list[list[np.ndarray]], size: int) -> np.ndarray:
    """Groups of 1..3 masks -> ``N x 3 x size x size`` low-res targets."""
    return np.stack([np.stack([low_res_target(m, size) for m in _pad3(g)]) for g in groups])


def image_step_loss(
    sam: Sam, embedding: torch.Tensor, sample: Sample, cfg: TrainConfig, rng: np.random.Generator,
    window: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the simulated interactions on one image (averaged over rounds). embedding ``1 x 256 x 64 x 64``.

    window: 0, or the side in cells of each prompt's window of the embedding (window training).
    """
    groups = [g for g in sample.groups if g and g[0].any()]
    if not groups:
        return embedding.sum() * 0.0, {}
    hw = sample.image.shape[:2]
    grid = embedding.shape[-1]
    low_res = 4 * grid  # 256 at full resolution
    lr_scale = low_res / max(hw)  # image px -> low-res px
    targets_np = _group_targets(groups, low_res)  # N x 3 x low_res x low_res
    offsets = np.zeros((len(groups), 2), np.int64)  # each prompt's window origin in low-res px (y, x)
    image_pe = None
    if window:
        cells = window_origins(targets_np, window, grid, rng)
        offsets = 4 * cells
        pe = sam.prompt_encoder.pe_layer((grid, grid))
        embedding = torch.stack([embedding[0, :, y : y + window, x : x + window] for y, x in cells])
        image_pe = torch.stack([pe[:, y : y + window, x : x + window] for y, x in cells])
        side = 4 * window
        targets_np = np.stack([t[:, y : y + side, x : x + side] for t, (y, x) in zip(targets_np, offsets)])
    # A target too small for the low-res frame (or outside its window) leaves nothing to click on.
    keep = targets_np[:, 0].any(axis=(1, 2))
    if not keep.all():
        if not keep.any():
            return embedding.sum() * 0.0, {}
        groups = [g for g, k in zip(groups, keep) if k]
        targets_np, offsets = targets_np[keep], offsets[keep]
        if window:
            idx = torch.from_numpy(np.flatnonzero(keep))
            embedding, image_pe = embedding[idx], image_pe[idx]
    dev = embedding.device
    targets = torch.from_numpy(targets_np).to(dev)
    n = len(groups)
    rows = torch.arange(n, device=dev)
    levels = rng.integers(3, size=n)  # which target each interaction refines
    # Every group a real 3-level hierarchy: match the levels to the candidates. Otherwise (e.g. a
    # single COCO mask) SAM's rule: the minimum loss over the three candidates for the target.
    full_hierarchy = all(len(g) >= 3 for g in groups)
    if not full_hierarchy:
        levels = np.full(n, 2)
    box_start = rng.uniform() < cfg.box_start_prob
    points: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    labels: list[list[int]] = [[] for _ in range(n)]
    boxes = None
    if box_start:
        boxes = torch.tensor(
            np.stack([to_frame(noisy_box(_pad3(g)[levels[i]], rng).reshape(2, 2), hw).reshape(4)
                      for i, g in enumerate(groups)]),
            dtype=torch.float32, device=dev,
        )
    else:
        for i, g in enumerate(groups):
            points[i].append(sample_point_in(g[0], rng))
            labels[i].append(1)
    level_t = targets[rows, torch.from_numpy(levels).to(dev)]  # N x 256 x 256
    level_np = targets_np[np.arange(n), levels]
    total = torch.zeros((), device=dev)
    stats: dict[str, float] = {}
    prev: torch.Tensor | None = None
    for rnd in range(cfg.rounds):
        if rnd > 0:
            prev_masks = (prev[:, 0] > 0).cpu().numpy()
            for i in range(n):
                click = sample_error_click(prev_masks[i], level_np[i], rng)
                if click is None:  # already exact: a positive point inside the target
                    click = (sample_point_in(level_np[i], rng), 1)
                (x, y), lab = click
                x, y = x + offsets[i, 1], y + offsets[i, 0]  # window -> full low-res frame
                points[i].append((x / lr_scale, y / lr_scale))  # low-res px -> image px
                labels[i].append(lab)
        pt = lb = None
        if points[0]:
            pt = torch.tensor(np.stack([to_frame(np.array(p), hw) for p in points]), dtype=torch.float32, device=dev)
            lb = torch.tensor(labels, dtype=torch.float32, device=dev)
        multimask = rnd == 0 and not box_start
        logits, iou_pred = decode(sam, embedding, pt, lb, boxes, prev, multimask, image_pe)
        scored = logits * cfg.logit_scale if cfg.logit_scale != 1 else logits
        if multimask and not full_hierarchy:
            m_loss, i_loss = losses.min_over_candidates_loss(scored, iou_pred, level_t)
            per = losses.mask_loss(scored.flatten(0, 1), level_t[:, None].expand_as(scored).flatten(0, 1))
            best = per.view(n, -1).argmin(1)
            prev = logits[rows, best][:, None].detach()
            stats["iou_r1_best"] = float(losses.mask_iou(prev[:, 0], level_t).mean())
        elif multimask and cfg.fixed_levels:
            # Candidate k is trained on level k (a layout whose tokens are built per level); a click with no
            # subpart (its subpart level repeats the part) leaves the subpart candidate out: that candidate is
            # kept near the click, and training it on a whole part teaches the codes to spill.
            flat_logits, flat_targets = scored.flatten(0, 1), targets.flatten(0, 1)
            per = losses.mask_loss(flat_logits, flat_targets).view(n, 3)
            used = torch.ones_like(per, dtype=torch.bool)
            used[:, 0] = (targets[:, 0] != targets[:, 1]).flatten(1).any(1)
            m_loss = per[used].mean()
            i_loss = losses.iou_head_loss(iou_pred.flatten(), flat_logits, flat_targets)
            prev = logits[rows, torch.from_numpy(levels).to(dev)][:, None].detach()
            stats["iou_r1_matched"] = float(losses.mask_iou(flat_logits, flat_targets).mean())
        elif multimask:
            m_loss, i_loss, assign = losses.matched_candidates_loss(scored, iou_pred, targets)
            # Continue with the candidate matched to each interaction's level.
            idx = []
            for i in range(n):
                hit = (assign[i] == int(levels[i])).nonzero()
                idx.append(int(hit[0]) if len(hit) else 0)
            prev = logits[rows, torch.tensor(idx, device=dev)][:, None].detach()
            matched = targets[rows[:, None], assign]
            stats["iou_r1_matched"] = float(losses.mask_iou(logits.flatten(0, 1), matched.flatten(0, 1)).mean())
        else:
            m_loss = losses.mask_loss(scored[:, 0], level_t).mean()
            i_loss = losses.iou_head_loss(iou_pred[:, 0], scored[:, 0], level_t)
            prev = logits.detach()
            stats[f"iou_r{rnd + 1}"] = float(losses.mask_iou(logits[:, 0], level_t).mean())
        total = total + m_loss + cfg.iou_loss_weight * i_loss
    return total / cfg.rounds, stats


def similarity_init(sam: Sam, generator: torch.Generator | None = None) -> None:
    """Start each image->token attention as a similarity match (for training a decoder from scratch).

    Its query and key projections get one shared random map with orthonormal rows and no bias, so an
    image token's attention logit to a prompt token grows with the similarity of their inputs; with
    the positional encodings in both, the image tokens near a click attend to its point token from
    the first step. A default (independent) initialization must first learn that match: measured on
    the simplest task (a disc around a random click, zero image features) it took 200 steps of 8
    clicks before any mask followed the click, against under 100 with this start.
    """
    with torch.no_grad():
        for layer in sam.mask_decoder.transformer.layers:
            attn = layer.cross_attn_image_to_token
            out_dim, in_dim = attn.q_proj.weight.shape
            q, _ = torch.linalg.qr(torch.randn(in_dim, out_dim, generator=generator))
            attn.q_proj.weight.copy_(q.T)
            attn.k_proj.weight.copy_(q.T)
            attn.q_proj.bias.zero_()
            attn.k_proj.bias.zero_()


def lr_factor(step: int, frac: float, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to 5% of the base rate as frac goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def focal_weight_at(frac: float, cfg: TrainConfig) -> float:
    """The focal term's weight at ``frac`` of the run under ``cfg.focal_ramp``."""
    lo, hi = cfg.focal_ramp
    if hi <= lo:
        return cfg.focal_weight
    return cfg.focal_weight * min(1.0, max(0.0, (frac - lo) / (hi - lo)))


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor,
                   stats: dict[str, float], ema: dict[str, float], *, keep: float) -> None:
    """One step on ``loss`` (gradients clipped at norm 1; none when nothing in it learns); ``stats`` gets the
    loss, and ``ema`` every stat smoothed (``keep`` of the old value a step)."""
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    stats["loss"] = float(loss.detach())
    for k, v in stats.items():
        ema[k] = v if k not in ema else keep * ema[k] + (1 - keep) * v


def save_checkpoint(sam: Sam, path: Path, extra: dict, *, half: bool = True) -> None:
    """Write ``{"model": state dict, ...extra}`` atomically, on the CPU; fp16 by default (keeps tiny under 15 MB)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in sam.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save({"model": state, **extra}, tmp)
    os.replace(tmp, path)


def train(
    sam: Sam,
    cfg: TrainConfig,
    samples: Callable[[int, np.random.Generator], Sample],
    *,
    out: Path | None = None,
    extra: dict | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int], None] | None = None,
    max_seconds: float | None = None,
) -> dict:
    """Train ``sam`` in place on ``samples(i, rng)`` for i = 0, 1, ...; checkpoints to ``out`` periodically.

    Trains on the device ``sam`` is on (samples are made on the CPU). Returns a summary: steps
    done, seconds, smoothed losses/IoUs.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = next(sam.parameters()).device
    for name, p in sam.named_parameters():
        p.requires_grad_((cfg.train_encoder or not name.startswith("image_encoder.")) and not name.startswith(tuple(cfg.frozen)))
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    sam.train()
    if not cfg.train_encoder:
        sam.image_encoder.eval()
    start = time.time()
    ema: dict[str, float] = {}
    first_loss = None
    sample_idx = 0
    done = 0

    def meta() -> dict:
        return {**(extra or {}), "train": {**asdict(cfg), "steps_done": done, "coarse_steps_done": coarse_done,
                                           "window_steps_done": window_done,
                                           "seconds": round(time.time() - start, 1)}}

    coarse_frac = cfg.coarse_steps / cfg.steps
    window_frac = cfg.window_steps / cfg.steps
    emb_cache: dict[str, torch.Tensor] = {}
    coarse_done = window_done = 0
    for step in range(cfg.steps):
        # Progress through the schedule: by steps, or by time when a time budget is given (the
        # shared CPU's speed varies, so a budgeted run still decays and reaches full resolution).
        frac = step / cfg.steps
        if max_seconds is not None:
            frac = max(frac, (time.time() - start) / max_seconds)
        if frac >= 1.0:
            log(f"stopped at the time limit after {done} steps")
            break
        lr_now = cfg.lr * lr_factor(step, frac, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_now
        batch = []
        for _ in range(cfg.images_per_step):
            batch.append(samples(sample_idx, rng))
            sample_idx += 1
        coarse = frac < coarse_frac and hasattr(sam.image_encoder, "forward_work")
        coarse_done += int(coarse)
        window = cfg.window_cells if not coarse and frac < window_frac else 0
        window_done += int(window > 0)
        grid = 32 if coarse else 64
        sam.prompt_encoder.image_embedding_size = (window, window) if window else (grid, grid)
        if not cfg.train_encoder and all(s.key is not None for s in batch):
            # Frozen encoder: each image is encoded once (fine-tuning official SAM on a CPU).
            for s in batch:
                if s.key not in emb_cache:
                    with torch.no_grad():
                        emb_cache[s.key] = sam.image_encoder(preprocess(s.image).to(device))
            emb = torch.cat([emb_cache[s.key] for s in batch])
        else:
            x = torch.cat([preprocess(s.image) for s in batch]).to(device)
            with torch.set_grad_enabled(cfg.train_encoder):
                if coarse:
                    emb = sam.image_encoder.forward_work(F.avg_pool2d(x, 1024 // 128))
                else:
                    emb = sam.image_encoder(x)
        loss = torch.zeros((), device=device)
        step_stats: dict[str, float] = {}
        n_levels = levels_at(frac, cfg)
        with losses.focal_weight(focal_weight_at(frac, cfg)):
            for i, s in enumerate(batch):
                s = replace(s, groups=restrict_levels(s.groups, n_levels))
                part, st = image_step_loss(sam, emb[i : i + 1], s, cfg, rng, window)
                if cfg.code_loss_weight and s.scene is not None and not coarse:
                    code, _ = region_code_loss(emb[i : i + 1], s.scene, rng)
                    part = part + cfg.code_loss_weight * code
                    st = {**st, "code": float(code.detach())}
                loss = loss + part / len(batch)
                step_stats.update(st)
        optimizer_step(opt, params, loss, step_stats, ema, keep=0.95)
        first_loss = step_stats["loss"] if first_loss is None else first_loss
        done = step + 1
        if progress:
            progress(1)
        if step % 10 == 0 or done == cfg.steps:
            log(f"step {step} t={time.time() - start:.0f}s lr={lr_now:.2e} grid={grid} window={window} levels={n_levels} "
                + " ".join(f"{k}={v:.3f}" for k, v in sorted(ema.items())))
        if out is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(sam, out, meta())
    sam.prompt_encoder.image_embedding_size = (64, 64)
    if out is not None and done % cfg.save_every and done != cfg.steps:
        save_checkpoint(sam, out, meta())
    sam.eval()
    for p in sam.parameters():
        p.requires_grad_(True)
    return {"steps": done, "coarse_steps": coarse_done, "window_steps": window_done, "seconds": time.time() - start,
            "first_loss": first_loss, **ema, "record": meta()["train"]}
