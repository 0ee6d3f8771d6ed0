"""How far the tiny model's learned encoder is from what its decoder layout can do.

``trimask eval``'s metrics on the same held-out scenes, twice: with the checkpoint's image encoder,
and with exact inputs in its place, i.e. what the encoder is trained to write (each cell the codes of
the region at its centre, at every level; objectness; each cell's exact 4 x 4 sub-cell patterns; the
second codes the encoder computes from them). The decoder, its thresholds, token 0's rule and the IoU
head are the checkpoint's in both. Exact codes are random, one per region and level, of norm 4, and
lie in the 15 dimensions that the decoder's comparison heads read (the 16th channel of each head is
the sink's). Random codes of different regions sometimes match (their dot product is above 8, the
code loss's cut, for about 2 % of pairs), and the interactive protocol feels it, so the exact column is
the mean over ``--code-seeds`` draws. ``--full-codes`` also scores codes spread over all 16 channels, as
the model card's first ceiling measure did, to show what the unread channel costs them.

    .venv/bin/python bench/layout_ceiling.py [--checkpoint FILE] [--scenes 30] [--seed 0] [--code-seeds 3]
        [--full-codes] [--threads 2]

Prints a markdown table. The gap between the columns is what better codes and patterns could buy.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from trimask.errors import TrimaskError
from trimask.models.build import build_sam
from trimask.models.tiny_encoder import with_patterns
from trimask.training import evaluate as ev
from trimask.training.code_pretrain import cell_labels
from trimask.training.decoder_start import CODE, CODE_DIM, COMPARED, OBJ, OBJECT_VALUE, PATTERN, SECOND
from trimask.training.pattern_pretrain import pattern_targets
from trimask.training.scenes import Scene

CODE_NORM = 4.0
CONFIDENT = float(np.tanh(0.5 * 18.0))  # the encoder's pattern value for a head logit far above its cut


def exact_embedding(scene: Scene, dims: int = COMPARED, seed: int = 1) -> torch.Tensor:
    """What the encoder is trained to write for ``scene`` (``1 x 256 x 64 x 64``)."""
    gen = torch.Generator().manual_seed(seed)
    labels, on = cell_labels(scene)
    out = torch.zeros(1, 256, 64, 64)
    for level, ids in enumerate(labels):
        table = torch.zeros(int(ids.max()) + 1, CODE_DIM)
        table[:, :dims] = torch.randn(len(table), dims, generator=gen)
        table = CODE_NORM * table / table.norm(dim=1, keepdim=True)
        codes = table[torch.from_numpy(ids)] * torch.from_numpy(on)[:, None].float()
        out[0, list(CODE[level])] = codes.T.reshape(CODE_DIM, 64, 64)
    out[0, OBJ] = OBJECT_VALUE * torch.from_numpy(on).float().reshape(64, 64)
    pattern = torch.from_numpy(pattern_targets(scene)).float().reshape(1, 48, 64, 64) * CONFIDENT
    return with_patterns(out, pattern, PATTERN[0][0], SECOND[0][0])


def evaluate_exact(sam, *, scenes: int, seed: int, dims: int, code_seed: int) -> dict[str, float]:
    """``trimask eval``'s metrics with ``exact_embedding`` in place of the encoder (the same scenes)."""
    current: dict[str, Scene] = {}
    generate, encoder = ev.generate_scene, sam.image_encoder.forward

    def scene_of(s: int) -> Scene:
        current["scene"] = generate(s)
        return current["scene"]

    ev.generate_scene = scene_of
    sam.image_encoder.forward = lambda x: exact_embedding(current["scene"], dims, code_seed)
    try:
        return ev.evaluate(sam, scenes=scenes, seed=seed)
    finally:
        ev.generate_scene, sam.image_encoder.forward = generate, encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a tiny checkpoint (default: the bundled weights)")
    ap.add_argument("--scenes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--code-seeds", type=int, default=3, help="draws of the exact codes to average (default 3)")
    ap.add_argument("--full-codes", action="store_true", help="also score exact codes spread over all 16 channels")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scenes < 1 or args.code_seeds < 1:
        ap.error("--scenes and --code-seeds must be at least 1")
    try:
        sam = build_sam("tiny", args.checkpoint).eval()
    except TrimaskError as exc:
        raise SystemExit(f"layout_ceiling: {exc}") from None
    columns = {}
    t0 = time.perf_counter()
    columns["learned encoder"] = ev.evaluate(sam, scenes=args.scenes, seed=args.seed)
    for name, dims in (("exact inputs", COMPARED), ("exact, 16-d codes", CODE_DIM)):
        if dims == CODE_DIM and not args.full_codes:
            continue
        runs = [evaluate_exact(sam, scenes=args.scenes, seed=args.seed, dims=dims, code_seed=1 + k)
                for k in range(args.code_seeds)]
        columns[name] = {key: float(np.mean([r[key] for r in runs])) if isinstance(value, float) else value
                         for key, value in runs[0].items()}
    names = list(columns)
    print(f"{args.scenes} scenes of seed {args.seed}; exact codes: mean of {args.code_seeds} draws; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| metric | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for key, value in columns[names[0]].items():
        cells = [f"{columns[n][key]:.3f}" if isinstance(value, float) else str(columns[n][key]) for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
