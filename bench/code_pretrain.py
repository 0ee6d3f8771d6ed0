"""Time of one step of the tiny encoder's code pre-training on this machine, phase by phase.

A step (``trimask.training.code_pretrain.pretrain_codes``) generates a scene, preprocesses it,
runs the encoder, computes the region-code loss and backpropagates. The table gives the median
milliseconds of each phase over ``--steps`` steps after two warm-up steps. To compare with an
earlier version of the generator or of the loss, give its module file (taken from git), which runs
on the same scenes, embeddings and anchors in this process, alternating with the current one:

    git show 81e3922:backend/trimask/training/scenes.py > /tmp/old_scenes.py
    git show 81e3922:backend/trimask/training/code_pretrain.py > /tmp/old_code_pretrain.py
    .venv/bin/python bench/code_pretrain.py --threads 2 \\
        --reference-scenes /tmp/old_scenes.py --reference-loss /tmp/old_code_pretrain.py

Prints a markdown table: current, reference, ratio current / reference (below 1: faster), and
whether the reference gave the same scenes (bit for bit) and the same loss.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from trimask.models.tiny_encoder import TinyImageEncoder
from trimask.preprocess import preprocess
from trimask.training import code_pretrain, scenes

SEED_BASE = 5_000_000


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-scenes", type=Path, help="an earlier trimask/training/scenes.py")
    ap.add_argument("--reference-loss", type=Path, help="an earlier trimask/training/code_pretrain.py")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref_scenes = _load(args.reference_scenes, "reference_scenes") if args.reference_scenes else None
    ref_loss = _load(args.reference_loss, "reference_code_pretrain") if args.reference_loss else None

    encoder = TinyImageEncoder()
    code_pretrain.prepare_encoder(encoder)
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {}
    same_scenes, loss_gap = True, 0.0
    for step in range(args.steps + 2):
        row: dict[str, float] = {}
        seed = SEED_BASE + step
        scene, row["generate scene"] = _timed(lambda: scenes.generate_scene(seed, varied_aspect=True))
        if ref_scenes:
            old, row["generate scene (reference)"] = _timed(lambda: ref_scenes.generate_scene(seed, varied_aspect=True))
            same_scenes &= all(np.array_equal(getattr(scene, f), getattr(old, f))
                               for f in ("image", "whole_map", "part_map", "subpart_map"))
        x, row["preprocess"] = _timed(lambda: preprocess(scene.image))
        embedding, row["encoder forward"] = _timed(lambda: encoder(x))
        (loss, _), row["loss forward"] = _timed(
            lambda: code_pretrain.region_code_loss(embedding, scene, np.random.default_rng(step)))
        _, row["backward + optimizer"] = _timed(lambda: (opt.zero_grad(), loss.backward(), opt.step()))

        def loss_alone(module: ModuleType) -> float:
            detached = embedding.detach().requires_grad_(True)
            value, _ = module.region_code_loss(detached, scene, np.random.default_rng(step))
            value.backward()
            return float(value.detach())

        value, row["loss forward + backward, alone"] = _timed(lambda: loss_alone(code_pretrain))
        if ref_loss:
            old_value, row["loss forward + backward, alone (reference)"] = _timed(lambda: loss_alone(ref_loss))
            loss_gap = max(loss_gap, abs(value - old_value))
        if step >= 2:
            for k, v in row.items():
                times.setdefault(k, []).append(v)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"code pre-training step, {args.threads} threads, median of {args.steps} steps (ms)\n")
    print("| phase | current | reference | ratio |\n| --- | --: | --: | --: |")
    for k in (k for k in med if "(reference)" not in k):
        ref = med.get(f"{k} (reference)")
        extra = f"{ref:.1f} | {med[k] / ref:.2f}" if ref else "- | -"
        print(f"| {k} | {med[k]:.1f} | {extra} |")
    phases = ("generate scene", "preprocess", "encoder forward", "loss forward", "backward + optimizer")
    step_now = sum(med[k] for k in phases)
    line = f"| **step** (the first five rows) | **{step_now:.1f}** |"
    if ref_scenes or ref_loss:
        # The reference step: its generator and its loss in place of the current ones.
        alone = "loss forward + backward, alone"
        step_ref = (step_now - med["generate scene"] + med.get("generate scene (reference)", med["generate scene"])
                    - med[alone] + med.get(f"{alone} (reference)", med[alone]))
        line += f" {step_ref:.1f} | {step_now / step_ref:.2f} |"
    else:
        line += " - | - |"
    print(line)
    if ref_scenes:
        print(f"\nthe reference generator gave the same scenes, bit for bit: {same_scenes}")
    if ref_loss:
        print(f"largest difference of the two losses: {loss_gap:.2e}")


if __name__ == "__main__":
    main()
