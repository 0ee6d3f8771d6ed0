"""Scenes per second of the tiny encoder's code pre-training: one scene a step made in the training
process (the CPU recipe) against batches made by worker processes (``--code-batch``, ``--code-workers``).

Each setting runs ``trimask.training.code_pretrain.pretrain_codes`` from the same fresh encoder for
``--seconds`` on the same scene stream; the rate is the median over its steps after the first
``--warmup`` (workers starting, CUDA warming up). On a GPU:

    python bench/code_throughput.py --device cuda --batch 16 --workers 14

Prints a markdown table: scenes per second, milliseconds per step, ratio against the first row.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from trimask.commands.train import _code_scene
from trimask.models.tiny_encoder import TinyImageEncoder
from trimask.training.code_pretrain import prepare_encoder, pretrain_codes


def rate(device: str, batch: int, workers: int, seconds: float, warmup: int) -> tuple[float, float, int]:
    """(median scenes per second, median ms per step, steps) of one setting."""
    torch.manual_seed(0)
    encoder = TinyImageEncoder()
    prepare_encoder(encoder)
    encoder.to(device)
    stamps: list[float] = []

    def tick(_: int) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    pretrain_codes(encoder, functools.partial(_code_scene, 5_000_000), steps=10**6, batch=batch, workers=workers,
                   max_seconds=seconds, log=lambda line: None, progress=tick)
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    if not gaps:
        raise SystemExit(f"batch {batch}, workers {workers}: fewer than {warmup + 2} steps in {seconds} s")
    step = statistics.median(gaps)
    return batch / step, step * 1000, len(stamps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=16, help="scenes per step of the batched setting")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="scene-making processes of the batched setting (default: the cores less one)")
    ap.add_argument("--seconds", type=float, default=20.0, help="run time of each setting")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of each median")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the training process")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [("one scene a step, made in the training process", 1, 0),
            (f"{args.batch} scenes a step, {args.workers} worker{'s' * (args.workers != 1)}", args.batch, args.workers)]
    print(f"code pre-training on {args.device} ({os.cpu_count()} CPU cores), {args.seconds:.0f} s per setting\n")
    print("| setting | scenes/s | ms/step | steps | ratio |\n| --- | --: | --: | --: | --: |")
    first = None
    for name, batch, workers in rows:
        per_s, ms, steps = rate(args.device, batch, workers, args.seconds, args.warmup)
        first = first or per_s
        print(f"| {name} | {per_s:.1f} | {ms:.1f} | {steps} | {per_s / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
