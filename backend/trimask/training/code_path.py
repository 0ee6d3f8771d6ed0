"""SAM's mask objectives on the tiny encoder's code path, through the laid-out decoder as it is.

The code-match decoder answers from codes the encoder writes; the region-code loss
(``code_pretrain``) trains those codes for themselves, this stage trains them for the answers they
give. Only the encoder's context path, fuse and neck learn: the trunk that the pattern head reads,
the pattern head and every decoder weight stay, so the layout, the patterns and the thresholds'
meaning hold. Per generated scene (cropped as in training):

- up to ``clicks`` subparts whose part and whole are strictly larger, as ``trimask eval`` picks
  them, are clicked once each (at the subpart's centre or, as often, a uniform pixel of it), and the
  three multimask candidates are trained each on its own level (subpart, part, whole), with
  ``level_weights``: the layout's tokens read one level each, so no assignment is needed;
- for one level of each clicked instance, drawn at random, a noisy box around it and
  ``click_rounds`` corrective clicks (the standard protocol's: each at the centre of the largest
  error of the answer before it, which is fed back as ``mask_input``; the first answer is that
  level's candidate) train the single-mask output, the rounds sharing ``click_weight``;
- the region-code loss keeps the codes apart beside it.

SAM's mask loss (focal + dice, the focal term weighted ``focal_weight``) on the logits times
``logit_scale``, AdamW, linear warm-up and
a cosine decay over the step or time budget, gradients clipped at norm 1. No IoU loss: the IoU head
is fitted afterwards to the answers the new codes give (``iou_fit``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from trimask.models.sam import Sam
from trimask.preprocess import preprocess
from trimask.training import losses
from trimask.training.code_pretrain import region_code_loss
from trimask.training.evaluate import center_point, click_instances, postprocess
from trimask.training.prompt_simulation import center_of_largest_error, noisy_box, sample_point_in
from trimask.training.scenes import Scene
from trimask.training.trainer import decode, low_res_target, optimizer_step, to_frame

# What learns: the encoder's code path. Everything else of the model stays (see the module's docstring).
CODE_PATH = ("image_encoder.down1.", "image_encoder.down2.", "image_encoder.context_blocks.",
             "image_encoder.mid_blocks.", "image_encoder.fuse.", "image_encoder.neck.")


@dataclass
class CodePathConfig:
    lr: float = 2e-4
    warmup_steps: int = 50
    clicks: int = 4  # clicked subparts per scene
    center_prob: float = 0.5  # a first click at the subpart's centre, else anywhere in it
    level_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the first click's subpart / part / whole
    box_weight: float = 1.0
    click_weight: float = 1.0  # the corrective clicks', shared among the rounds
    click_rounds: int = 1  # corrective clicks after the first (1: the second click only; 4: up to the fifth)
    code_weight: float = 1.0  # the region-code loss's
    code_dims: int = 16  # the code channels it compares (15: those the decoder's comparison heads read)
    focal_weight: float = 1.0
    # The losses see the logits times this. The layout's logits are soft (a subpart candidate's median is about
    # +1 inside and -2 outside), so over a 256 x 256 frame the soft dice of a small region is near 1 whatever
    # its IoU, and its gradient lowers the background's probability instead of moving the edges; sharpened,
    # the loss follows the mask the decoder gives at 0.
    logit_scale: float = 4.0


def scene_loss(sam: Sam, embedding: torch.Tensor, scene: Scene, rng: np.random.Generator,
               cfg: CodePathConfig) -> tuple[torch.Tensor, dict[str, float]] | None:
    """The stage's loss on one scene's ``1 x 256 x 64 x 64`` embedding; None when it has no subpart to click."""
    inst = click_instances(scene, cfg.clicks, rng)
    if not inst:
        return None
    hw = scene.image.shape[:2]
    dev = embedding.device
    first = [center_point(s) if rng.uniform() < cfg.center_prob else sample_point_in(s, rng) for s, _, _ in inst]
    pts = torch.tensor(np.stack([to_frame(np.array([p]), hw) for p in first]), dtype=torch.float32, device=dev)
    logits, _ = decode(sam, embedding, pts, torch.ones(len(inst), 1, device=dev), None, None, True)
    targets = torch.from_numpy(np.stack([np.stack([low_res_target(m) for m in levels]) for levels in inst])).float().to(dev)
    weights = torch.tensor(cfg.level_weights, dtype=torch.float32, device=dev)
    with losses.focal_weight(cfg.focal_weight):
        per_level = losses.mask_loss(cfg.logit_scale * logits.flatten(0, 1), targets.flatten(0, 1)).view(-1, 3)
        loss = (per_level * weights).mean()
        stats = {f"first_{name}": float(per_level[:, k].detach().mean()) for k, name in enumerate(("subpart", "part", "whole"))}
        # One level of each instance for the box and the second click.
        level = rng.integers(3, size=len(inst))
        rows = torch.arange(len(inst), device=dev)
        chosen = [inst[i][level[i]] for i in range(len(inst))]
        chosen_t = targets[rows, torch.from_numpy(level).to(dev)]
        if cfg.box_weight:
            boxes = np.stack([to_frame(noisy_box(m, rng, noise=0.1 * rng.uniform()).reshape(2, 2), hw).reshape(4)
                              for m in chosen])
            box_logits, _ = decode(sam, embedding, None, None, torch.tensor(boxes, dtype=torch.float32, device=dev),
                                   None, False)
            box_loss = losses.mask_loss(cfg.logit_scale * box_logits[:, 0], chosen_t).mean()
            loss = loss + cfg.box_weight * box_loss
            stats["box"] = float(box_loss.detach())
        if cfg.click_weight and cfg.click_rounds:
            # The standard protocol's corrective clicks: each at the centre of the largest error of the answer
            # before it (the first click's candidate of the chosen level, then token 0's), fed back as mask_input.
            prev = logits.detach()[rows, torch.from_numpy(level).to(dev)][:, None]
            clicks = [[first[i]] for i in range(len(inst))]
            labels = [[1] for _ in inst]
            for k in range(cfg.click_rounds):
                answers = postprocess(prev, hw)[:, 0].cpu().numpy()
                for i, m in enumerate(chosen):
                    nxt = center_of_largest_error(answers[i], m) or (first[i], 1)
                    clicks[i].append(nxt[0])
                    labels[i].append(nxt[1])
                points = np.stack([to_frame(np.array(c), hw) for c in clicks])
                answer, _ = decode(sam, embedding, torch.tensor(points, dtype=torch.float32, device=dev),
                                   torch.tensor(labels, dtype=torch.float32, device=dev), None, prev, False)
                click_loss = losses.mask_loss(cfg.logit_scale * answer[:, 0], chosen_t).mean()
                loss = loss + cfg.click_weight * click_loss / cfg.click_rounds
                stats["second_click" if k == 0 else f"click_{k + 2}"] = float(click_loss.detach())
                prev = answer.detach()[:, :1]
    if cfg.code_weight:
        code, _ = region_code_loss(embedding, scene, rng, dims=cfg.code_dims)
        loss = loss + cfg.code_weight * code
        stats["code"] = float(code.detach())
    return loss, stats


def train_code_path(
    sam: Sam,
    scenes: Callable[[int], Scene],
    cfg: CodePathConfig,
    *,
    steps: int,
    seed: int = 0,
    max_seconds: float | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train ``sam``'s code path on ``scenes(i)``, i = 0, 1, ..., one scene a step, for ``steps`` steps or
    ``max_seconds``; returns a summary (steps, scenes drawn, seconds, smoothed losses, the config)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(sam.parameters()).device
    params = [p for name, p in sam.named_parameters() if name.startswith(CODE_PATH)]
    if not params:
        raise ValueError("the model's encoder has no code path (context, fuse, neck) to train")
    kept = [p for name, p in sam.named_parameters() if not name.startswith(CODE_PATH)]
    for p in kept:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start = time.time()
    ema: dict[str, float] = {}
    first_loss = None
    done = drawn = 0
    try:
        while done < steps:
            frac = done / steps
            if max_seconds is not None:
                frac = max(frac, (time.time() - start) / max_seconds)
            if frac >= 1.0:
                break
            scene = scenes(drawn)
            drawn += 1
            embedding = sam.image_encoder(preprocess(scene.image).to(device))
            out = scene_loss(sam, embedding, scene, rng, cfg)
            if out is None:
                continue
            loss, stats = out
            warm = min(1.0, (done + 1) / cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
            optimizer_step(opt, params, loss, stats, ema, keep=0.98)
            first_loss = stats["loss"] if first_loss is None else first_loss
            done += 1
            if progress:
                progress(1)
            if done % 50 == 0:
                log(f"code path step {done} t={time.time() - start:.0f}s "
                    + " ".join(f"{k}={v:.3f}" for k, v in sorted(ema.items())))
    finally:
        for p in kept:
            p.requires_grad_(True)
    return {"steps": done, "scenes": drawn, "seconds": round(time.time() - start, 1), "first_loss": first_loss,
            **{f"ema_{k}": v for k, v in ema.items()}, "config": asdict(cfg)}
