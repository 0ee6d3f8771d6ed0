"""Fine-tuning a SAM (official or tiny) on COCO annotations: SAM's "data engine" loop.

The same objectives and simulated prompting as the tiny model's training
(``trainer.train``), on masks read from a COCO file. The result is a checkpoint
``{"model": state_dict, ...}`` that ``build_sam`` loads like any other. Two recipes:

- ``sam`` (SAM's, for official checkpoints and any model trained end to end): the prompt
  encoder and mask decoder learn (each image is encoded once); with ``train_encoder`` the image
  encoder too.
- ``code-path`` (for checkpoints made from the code-match layout, such as the embedded ``tiny``):
  their decoder is a program laid out by hand that answers from codes the encoder writes, and
  SAM's loss on its weights undoes it (measured on ``tiny``: best-of-three 0.784 / 0.838 / 0.860
  -> 0.081 / 0.366 / 0.858 after 200 steps on 32 generated scenes' annotations). Here only the
  encoder's code path learns (``code_path.CODE_PATH``) through the decoder as it is, as stage 2e of
  the tiny model's training does: the mask losses on the logits x 4, focal weighted 1, no IoU loss
  (the IoU head stays), candidate k on level k where every click has a 3-level hierarchy.

``auto`` picks ``code-path`` for a checkpoint whose record says it was made from the code-match
layout (``uses_code_match_layout``) and ``sam`` otherwise.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trimask.errors import TrimaskError
from trimask.models.sam import Sam
from trimask.models.tiny_encoder import TinyImageEncoder
from trimask.preprocess import preprocess
from trimask.training.coco_dataset import CocoImage, coco_sampler, load_coco_images
from trimask.training.code_path import CODE_PATH
from trimask.training.evaluate import postprocess
from trimask.training.losses import FOCAL_WEIGHT
from trimask.training.prompt_simulation import center_of_largest_error
from trimask.training.trainer import TrainConfig, decode, save_checkpoint, to_frame, train

RECIPES = ("auto", "sam", "code-path")
# The code-path recipe's fixed settings (stage 2e's: ``code_path.CodePathConfig``).
CODE_PATH_FOCAL_WEIGHT = 1.0
CODE_PATH_LOGIT_SCALE = 4.0


def uses_code_match_layout(record: dict | None) -> bool:
    """Whether a checkpoint's record (its dict beside ``model``) says a code-match start made it, at any
    depth of its ``init_record`` chain (a checkpoint trained on from one keeps the one before as that)."""
    while isinstance(record, dict):
        if record.get("code_match_start"):
            return True
        record = record.get("init_record")
    return False


def resolve_recipe(recipe: str, sam: Sam, record: dict | None) -> str:
    """``auto`` -> ``code-path`` or ``sam``; an explicit ``code-path`` needs an encoder with a code path."""
    if recipe not in RECIPES:
        raise TrimaskError(f"--recipe must be one of {', '.join(RECIPES)}.")
    if recipe == "auto":
        recipe = "code-path" if uses_code_match_layout(record) else "sam"
    if recipe == "code-path":
        _check_code_path(sam)
    return recipe


def _check_code_path(sam: Sam) -> None:
    if not isinstance(sam.image_encoder, TinyImageEncoder):
        raise TrimaskError("--recipe code-path needs the tiny model's encoder (it has the code path to train).")


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
    focal_weight: float | None = None,
    recipe: str = "sam",
    out: Path | None = None,
    extra: dict | None = None,
    log=print,
    progress=None,
) -> dict:
    """Fine-tune ``sam`` in place on the annotations of ``images``; returns the trainer's summary.

    ``recipe``: ``sam`` or ``code-path`` (the module's docstring; ``resolve_recipe`` turns ``auto`` into
    one). ``focal_weight``: the focal term's weight against dice (None: the recipe's, SAM's 20 or the code
    path's 1). A model trained without focal can lose its masks under 20 x focal; 0 keeps dice alone.
    """
    if recipe not in RECIPES[1:]:
        raise TrimaskError(f"recipe must be 'sam' or 'code-path', not {recipe!r}.")
    code_path = recipe == "code-path"
    if code_path:
        _check_code_path(sam)
        if train_encoder:
            raise TrimaskError("--train-encoder is for --recipe sam; the code-path recipe trains the encoder's code "
                               "path and keeps its trunk and pattern head, which the decoder's layout reads.")
    if focal_weight is None:
        focal_weight = CODE_PATH_FOCAL_WEIGHT if code_path else FOCAL_WEIGHT
    if focal_weight < 0:
        raise TrimaskError("--focal-weight must be 0 or more.")
    cfg = TrainConfig(seed=seed, steps=steps, lr=lr, prompts_per_image=prompts_per_image, rounds=rounds,
                      focal_weight=focal_weight,
                      warmup_steps=max(1, min(20, steps // 10)), train_encoder=code_path or train_encoder,
                      save_every=max(steps, 1), coarse_steps=0)
    if code_path:
        # Everything but the code path stays: the decoder, the prompt encoder, the trunk and the pattern head.
        kept = tuple(name for name, _ in sam.named_parameters() if not name.startswith(CODE_PATH))
        cfg = replace(cfg, frozen=kept, logit_scale=CODE_PATH_LOGIT_SCALE, iou_loss_weight=0.0,
                      fixed_levels=True)
    summary = train(sam, cfg, coco_sampler(images, prompts_per_image=cfg.prompts_per_image),
                    log=log, progress=progress)
    if out is not None:
        save_checkpoint(sam, out, {**(extra or {}), "finetune": {"steps": summary["steps"], "lr": lr, "seed": seed,
                                                                   "train_encoder": cfg.train_encoder,
                                                                   "focal_weight": focal_weight,
                                                                   "recipe": recipe}}, half=False)
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
    recipe = resolve_recipe(args.recipe, sam, src_extra)
    sam.to(device)
    # The source's record rides along (a fine-tuned tiny is still the code-match layout for the next run).
    extra = {"init_record": src_extra} if src_extra else {}
    if "encoder_kwargs" in src_extra:
        extra["encoder_kwargs"] = src_extra["encoder_kwargs"]
    images = load_coco_images(args.coco, args.images)
    print(f"recipe: {recipe}" + (" (the code-match layout's decoder stays; its encoder's code path learns)"
                                 if recipe == "code-path" else ""), file=sys.stderr)
    with tqdm(total=args.steps, desc="finetune", unit="step", file=sys.stderr) as bar:
        summary = finetune(sam, images, steps=args.steps, lr=args.lr, seed=args.seed,
                           train_encoder=args.train_encoder, focal_weight=args.focal_weight, recipe=recipe,
                           out=args.out, extra=extra,
                           log=lambda s: tqdm.write(s, file=sys.stderr), progress=bar.update)
    print(f"wrote {args.out} after {summary['steps']} steps (loss {summary['first_loss']:.3f} -> {summary['loss']:.3f})")
    return 0
