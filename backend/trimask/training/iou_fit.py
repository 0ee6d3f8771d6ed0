"""Fitting the IoU head on a frozen model's own answers (the tiny model's last training stage).

SAM trains its IoU head with the MSE between each output's predicted IoU and its actual IoU. When
everything before the head is frozen (the code-match layout and the pre-trained encoder), that is a
regression on fixed inputs: the IoU token's final state. So rather than running the decoder forward
and backward at every step, this module answers simulated prompts once, keeps the token's state and
each output's actual IoU, and fits the head on them for many passes, a held-out fifth choosing when
to stop. Per prompt (as the trainer simulates them):

- a click inside a subpart (three candidates): each candidate's IoU with the level (subpart, part,
  whole) it fits best, since any of them is a right answer to an ambiguous click;
- then a corrective click from the error region of the candidate that fits a chosen level best,
  with its logits as the mask input (single-mask output): the IoU with that level;
- or a box around a level's mask with 10 % noise (single-mask output): the IoU with that mask.

IoUs are measured on the decoder's 256 x 256 low-res grid, as the trainer measures them.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Iterable

import numpy as np
import torch

from trimask.models.sam import Sam
from trimask.preprocess import preprocess
from trimask.training.losses import mask_iou
from trimask.training.prompt_simulation import noisy_box, sample_error_click, sample_point_in
from trimask.training.scenes import Scene
from trimask.training.trainer import LOW_RES, decode, low_res_target, to_frame

BOX_PROB = 0.35  # share of prompts that start from a box, as in the trainer


@torch.no_grad()
def collect_answers(sam: Sam, scenes: Iterable[Scene], *, seed: int = 0, prompts_per_scene: int = 4,
                    max_seconds: float | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Answer simulated prompts on ``scenes`` (until they or ``max_seconds`` run out).

    Returns ``states`` (M x 256: the IoU token's final state, the head's input), ``targets`` (M x 4:
    the actual IoU of each output) and ``valid`` (M x 4 bool: the outputs the prompt used: 1..3 for a
    click's candidates, 0 for a single-mask answer), and ``scenes``, the number used.
    """
    sam.eval()
    rng = np.random.default_rng(seed)
    head_inputs: list[torch.Tensor] = []
    hook = sam.mask_decoder.iou_prediction_head.register_forward_hook(lambda m, i, o: head_inputs.append(i[0]))
    states, targets, valid = [], [], []

    def keep(logits: torch.Tensor, ious: torch.Tensor, multimask: bool) -> None:
        n = logits.shape[0]
        t, v = torch.zeros(n, 4), torch.zeros(n, 4, dtype=torch.bool)
        if multimask:
            t[:, 1:], v[:, 1:] = ious, True
        else:
            t[:, 0], v[:, 0] = ious, True
        states.append(head_inputs[-1].detach().cpu())
        targets.append(t)
        valid.append(v)

    start, used = time.time(), 0
    device = next(sam.parameters()).device
    try:
        for scene in scenes:
            if max_seconds is not None and time.time() - start >= max_seconds:
                break
            used += 1
            if progress:
                progress(1)
            groups = _groups(scene, rng, prompts_per_scene)
            if not groups:
                continue
            hw = scene.image.shape[:2]
            emb = sam.image_encoder(preprocess(scene.image).to(device))
            levels = torch.from_numpy(np.stack([[low_res_target(m) for m in g] for g in groups])).to(device)  # N x 3 x 256 x 256
            n = len(groups)
            boxed = rng.uniform(size=n) < BOX_PROB
            goal = rng.integers(3, size=n)  # the level each prompt is after
            rows = torch.arange(n, device=device)
            goal_t = levels[rows, torch.from_numpy(goal).to(device)]
            if boxed.any():
                idx = np.flatnonzero(boxed)
                boxes = torch.tensor(np.stack([to_frame(noisy_box(groups[i][goal[i]], rng).reshape(2, 2), hw).reshape(4)
                                               for i in idx]), dtype=torch.float32, device=device)
                logits, _ = decode(sam, emb, None, None, boxes, None, False)
                keep(logits, mask_iou(logits[:, 0], goal_t[idx]).cpu(), False)
            idx = np.flatnonzero(~boxed)
            if not len(idx):
                continue
            clicks = [sample_point_in(groups[i][0], rng) for i in idx]
            pts = torch.tensor(np.stack([to_frame(np.array([c]), hw) for c in clicks]), dtype=torch.float32, device=device)
            lbl = torch.ones(len(idx), 1, device=device)
            logits, _ = decode(sam, emb, pts, lbl, None, None, True)  # k x 3 x 256 x 256
            k = len(idx)
            fits = torch.stack([mask_iou(logits[:, c:c + 1].expand(-1, 3, -1, -1).flatten(0, 1),
                                         levels[idx].flatten(0, 1)).view(k, 3) for c in range(3)], 1)  # k x cand x level
            keep(logits, fits.max(2).values.cpu(), True)
            # A corrective click on the candidate closest to the goal level, its logits as the mask input.
            g = torch.from_numpy(goal[idx]).to(device)
            best = fits[torch.arange(k, device=device), :, g].argmax(1)
            prev = logits[torch.arange(k, device=device), best][:, None]
            prev_masks = (prev[:, 0] > 0).cpu().numpy()
            goal_np = goal_t[idx].cpu().numpy()
            scale = LOW_RES / max(hw)
            pts2, lbl2 = [], []
            for j in range(k):
                hit = sample_error_click(prev_masks[j], goal_np[j], rng)
                (x, y), lab = hit if hit is not None else (sample_point_in(goal_np[j], rng), 1)
                pts2.append([clicks[j], (x / scale, y / scale)])  # low-res px -> image px
                lbl2.append([1, lab])
            pts2 = torch.tensor(np.stack([to_frame(np.array(p), hw) for p in pts2]), dtype=torch.float32, device=device)
            logits2, _ = decode(sam, emb, pts2, torch.tensor(lbl2, dtype=torch.float32, device=device), None, prev, False)
            keep(logits2, mask_iou(logits2[:, 0], goal_t[idx]).cpu(), False)
    finally:
        hook.remove()
    if not states:
        raise ValueError("no prompts could be made on these scenes")
    return {"states": torch.cat(states), "targets": torch.cat(targets), "valid": torch.cat(valid), "scenes": used}


def _groups(scene: Scene, rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(subpart, part, whole) masks at random points: half in subparts, half anywhere on an object."""
    sub_ids = scene.subpart_ids()
    on_object = scene.whole_map > 0
    out = []
    for _ in range(count):
        if sub_ids and rng.uniform() < 0.5:
            where = scene.subpart_map == sub_ids[int(rng.integers(len(sub_ids)))]
        elif on_object.any():
            where = on_object
        else:
            continue
        x, y = sample_point_in(where, rng)
        out.append(scene.masks_at(int(y), int(x)))
    return out


def fit_iou_head(head: torch.nn.Module, answers: dict[str, torch.Tensor], *, steps: int = 4000, lr: float = 1e-3,
                 batch: int = 256, seed: int = 0, check_every: int = 100) -> dict:
    """Fit ``head`` (in place) to ``answers`` (``collect_answers``) with the MSE over the valid outputs.

    A fifth of the answers (chosen by ``seed``) is held out: the head keeps the weights with the lowest
    held-out MSE, checked every ``check_every`` steps. Returns the held-out MSE before and after, the
    step chosen, and the held-out ranked-first IoU of click answers (the IoU with its best-fitting level
    of the candidate the head ranks first) before and after, beside the best possible.
    """
    x, y, v = answers["states"], answers["targets"], answers["valid"].float()
    device = next(head.parameters()).device
    x, y, v = x.to(device), y.to(device), v.to(device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen).to(device)
    n_val = max(1, len(x) // 5)
    if len(x) - n_val < 1:
        raise ValueError("too few answers to fit and hold out")
    val, trn = order[:n_val], order[n_val:]

    def mse(idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((head(x[idx]) - y[idx]).square() * v[idx]).sum() / v[idx].sum().clamp(min=1))

    def ranked_first(idx: torch.Tensor) -> float:
        clicks = idx[v[idx, 1] > 0]
        if not len(clicks):
            return float("nan")
        with torch.no_grad():
            top = head(x[clicks])[:, 1:].argmax(1)
        return float(y[clicks, 1:].gather(1, top[:, None]).mean())

    val_clicks = val[v[val, 1] > 0]
    summary = {"answers": len(x), "held_out": n_val, "mse_before": mse(val), "ranked_first_before": ranked_first(val),
               "ranked_first_best_possible": float(y[val_clicks, 1:].max(1).values.mean()) if len(val_clicks) else float("nan")}
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    best_state, best_mse, best_step = copy.deepcopy(head.state_dict()), summary["mse_before"], 0
    head.train()
    for step in range(1, steps + 1):
        pick = trn[torch.randint(len(trn), (min(batch, len(trn)),), generator=gen).to(device)]
        loss = ((head(x[pick]) - y[pick]).square() * v[pick]).sum() / v[pick].sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every == 0:
            now = mse(val)
            if now < best_mse:
                best_state, best_mse, best_step = copy.deepcopy(head.state_dict()), now, step
    head.load_state_dict(best_state)
    head.eval()
    summary.update(mse_after=best_mse, step_chosen=best_step, ranked_first_after=ranked_first(val))
    return summary
