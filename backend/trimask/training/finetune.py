"""Fine-tuning a SAM (official or tiny) on COCO annotations: SAM's "data engine" loop.

The same objectives and simulated prompting as the tiny model's training
(``trainer.train``), on masks read from a COCO file. By default only the
prompt encoder and mask decoder learn (each image is encoded once); with
``train_encoder`` the image encoder learns too. The result is a checkpoint
``{"model": state_dict, ...}`` that ``build_sam`` loads like any other.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from trimask.errors import TrimaskError
from trimask.models.sam import Sam
from trimask.preprocess import preprocess
from trimask.training.coco_dataset import CocoImage, coco_sampler, load_coco_images
from trimask.training.evaluate import postprocess
from trimask.training.losses import FOCAL_WEIGHT
from trimask.training.prompt_simulation import center_of_largest_error
from trimask.training.trainer import TrainConfig, decode, save_checkpoint, to_frame, train


@torch.no_grad()
def click_miou(sam: Sam, images: list[CocoImage], *, clicks: int = 3) -> float:
    """Mean IoU over all annotations after ``clicks`` standard-protocol clicks.

    Click 1 at the mask's centre (candidate ranked first by the IoU head), then at the centre
    of the largest error region with the single-mask output and the previous logits as mask_input.
    """
    sam.eval()
    ious = []
    for ci in images:
        hw = ci.image.shape[:2]
        emb = sam.image_encoder(preprocess(ci.image))
        points = [[center_of_largest_error(np.zeros_like(m), m)[0]] for m in ci.masks]
        labels = [[1] for _ in ci.masks]
        prev = None
        masks = None
        for click in range(clicks):
            pt = torch.tensor(np.stack([to_frame(np.array(p), hw) for p in points]), dtype=torch.float32)
            lb = torch.tensor(labels, dtype=torch.float32)
            if click == 0:
                logits, iou_pred = decode(sam, emb, pt, lb, None, None, True)
                prev = logits[torch.arange(len(points)), iou_pred.argmax(1)][:, None]
            else:
                prev, _ = decode(sam, emb, pt, lb, None, prev, False)
            masks = postprocess(prev, hw)[:, 0].numpy()
            for i, (m, t) in enumerate(zip(masks, ci.masks)):
                nxt = center_of_largest_error(m, t) or (points[i][-1], labels[i][-1])
                points[i].append(nxt[0])
                labels[i].append(nxt[1])
        for m, t in zip(masks, ci.masks):
            union = np.logical_or(m, t).sum()
            ious.append(float(np.logical_and(m, t).sum() / union) if union else 1.0)
    return float(np.mean(ious))


def finetune(
    sam: Sam,
    images: list[CocoImage],
    *,
    steps: int = 200,
    lr: float = 1e-4,
    seed: int = 0,
    train_encoder: bool = False,
    prompts_per_image: int = 4,
    rounds: int = 3,
    focal_weight: float = FOCAL_WEIGHT,
    out: Path | None = None,
    extra: dict | None = None,
    log=print,
    progress=None,
) -> dict:
    """Fine-tune ``sam`` in place on the annotations of ``images``; returns the trainer's summary.

    ``focal_weight``: the focal term's weight against dice (SAM's 20 by default). A model trained
    without focal can lose its masks under 20 x focal; 0 keeps dice alone.
    """
    if focal_weight < 0:
        raise TrimaskError("--focal-weight must be 0 or more.")
    cfg = TrainConfig(seed=seed, steps=steps, lr=lr, prompts_per_image=prompts_per_image, rounds=rounds,
                      focal_weight=focal_weight,
                      warmup_steps=max(1, min(20, steps // 10)), train_encoder=train_encoder,
                      save_every=max(steps, 1), coarse_steps=0)
    summary = train(sam, cfg, coco_sampler(images, prompts_per_image=cfg.prompts_per_image),
                    log=log, progress=progress)
    if out is not None:
        save_checkpoint(sam, out, {**(extra or {}), "finetune": {"steps": summary["steps"], "lr": lr, "seed": seed,
                                                                   "train_encoder": train_encoder,
                                                                   "focal_weight": focal_weight}}, half=False)
    return summary


def run_finetune_command(args: argparse.Namespace) -> int:
    """``trimask finetune``: load model and COCO data, fine-tune with a progress bar, write the checkpoint."""
    from tqdm import tqdm

    from trimask.embedder import resolve_device
    from trimask.models.build import build_sam_and_extra

    if args.steps < 1:
        raise TrimaskError("--steps must be at least 1.")
    device = resolve_device(args.device)
    sam, src_extra = build_sam_and_extra(args.model, args.checkpoint)
    sam.to(device)
    extra = {}
    if "encoder_kwargs" in src_extra:
        extra["encoder_kwargs"] = src_extra["encoder_kwargs"]
    images = load_coco_images(args.coco, args.images)
    with tqdm(total=args.steps, desc="finetune", unit="step", file=sys.stderr) as bar:
        summary = finetune(sam, images, steps=args.steps, lr=args.lr, seed=args.seed,
                           train_encoder=args.train_encoder, focal_weight=args.focal_weight, out=args.out, extra=extra,
                           log=lambda s: tqdm.write(s, file=sys.stderr), progress=bar.update)
    print(f"wrote {args.out} after {summary['steps']} steps (loss {summary['first_loss']:.3f} -> {summary['loss']:.3f})")
    return 0
