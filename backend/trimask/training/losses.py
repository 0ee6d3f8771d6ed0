"""SAM's training objectives.

Mask loss = 20 x focal (alpha 0.25, gamma 2) + 1 x dice, per predicted mask.
An ambiguous prompt (one point) is trained through its three multimask outputs
with the minimum loss over the three (only the best candidate gets the mask
gradient); with several valid targets (subpart, part, whole under one click)
the targets are matched to candidates by the assignment of least total loss,
which is the same rule applied per target. The IoU head regresses the actual
IoU of each candidate with MSE.
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
_focal_weight = FOCAL_WEIGHT  # what mask_loss uses now; the trainer's curriculum lowers it early on


@contextlib.contextmanager
def focal_weight(weight: float):
    """Use ``weight`` instead of SAM's 20 for the focal term inside the block."""
    global _focal_weight
    saved, _focal_weight = _focal_weight, weight
    try:
        yield
    finally:
        _focal_weight = saved
DICE_WEIGHT = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss, mean over pixels. logits, target: ``N x H x W`` -> ``N``."""
    target = target.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss. logits, target: ``N x H x W`` -> ``N``."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.float().flatten(1)
    num = 2 * (p * t).sum(1) + eps
    den = p.sum(1) + t.sum(1) + eps
    return 1 - num / den


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """20 x focal + 1 x dice per mask (see ``focal_weight``). ``N x H x W`` -> ``N``."""
    return _focal_weight * focal_loss(logits, target) + DICE_WEIGHT * dice_loss(logits, target)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with target, no gradient. ``N x H x W`` -> ``N``; empty/empty counts as 1."""
    with torch.no_grad():
        pred = logits > 0
        t = target.bool()
        inter = (pred & t).flatten(1).sum(1).float()
        union = (pred | t).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_head_loss(iou_pred: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and actual IoU. iou_pred ``N``; logits, target ``N x H x W`` -> scalar."""
    return F.mse_loss(iou_pred, mask_iou(logits, target))


def min_over_candidates_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ambiguous-prompt loss.

    logits: ``N x K x H x W`` (K candidates), iou_pred ``N x K``, target ``N x H x W``.
    Returns (mask loss: mean over N of the minimum over K, IoU MSE over all K candidates).
    Only the best candidate of each prompt receives mask gradient.
    """
    n, k = logits.shape[:2]
    tgt = target[:, None].expand(-1, k, -1, -1).reshape(n * k, *target.shape[1:])
    per = mask_loss(logits.reshape(n * k, *logits.shape[2:]), tgt).view(n, k)
    best = per.min(dim=1).values.mean()
    iou = iou_head_loss(iou_pred.reshape(-1), logits.reshape(n * k, *logits.shape[2:]), tgt)
    return best, iou


def matched_candidates_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several valid targets for one ambiguous prompt, matched one-to-one to the candidates.

    logits: ``N x K x H x W``, iou_pred ``N x K``, targets ``N x K x H x W`` (e.g. subpart, part, whole;
    a missing level repeats the next larger one). For each prompt the assignment (permutation) of
    targets to candidates with the least total mask loss is used; each candidate is trained on its
    assigned target and its IoU head on the IoU with that target.
    Returns (mask loss averaged over targets and prompts, IoU MSE, assignment ``N x K``: target index per candidate).
    """
    n, k, h, w = logits.shape
    pred = logits[:, :, None].expand(n, k, k, h, w).reshape(-1, h, w)
    tgt = targets[:, None].expand(n, k, k, h, w).reshape(-1, h, w)
    cost = mask_loss(pred, tgt).view(n, k, k)  # [prompt, candidate, target]
    perms = torch.tensor(list(itertools.permutations(range(k))), device=logits.device)  # P x K
    cand = torch.arange(k, device=logits.device)
    totals = cost[:, cand[None, :], perms].sum(-1)  # N x P
    best = totals.argmin(1)
    assign = perms[best]  # N x K
    loss = totals.gather(1, best[:, None]).squeeze(1).mean() / k
    assigned_t = targets[torch.arange(n)[:, None], assign]  # N x K x H x W
    iou = iou_head_loss(iou_pred.reshape(-1), logits.reshape(-1, h, w), assigned_t.reshape(-1, h, w))
    return loss, iou, assign
