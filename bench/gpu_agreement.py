"""How closely the CUDA reduced-precision encoder agrees with float32.

For each image, the embedding is computed twice on the GPU with the same
weights: in float32 (TF32 off, the reference) and as trimask runs it (bf16
autocast, or fp16 where bf16 is missing; ``--dtypes`` picks). Reported:

- cosine similarity of the two embeddings (min and mean over images);
- IoU of the decoded masks: the PyTorch mask decoder (float32) decodes
  ``--prompts`` random single-point prompts per image from each embedding,
  all 4 tokens, upsampled to the image size as SAM does and thresholded at 0;
  mean, 5th percentile and min over prompts x tokens (pairs where both masks
  are empty are skipped).

With ``--checkpoint`` the given official weights are used (meaningful numbers);
without, random official-format weights (tests/checkpoint_factory.py), which
exercise the same arithmetic but decode less natural masks.

    .venv/bin/python bench/gpu_agreement.py [--model vit_b] [--checkpoint FILE]
        [--dtypes bf16,fp16] [--prompts 32] [--device cuda]

``--device cpu`` runs the same comparison with CPU autocast (a smoke test of
this script; CPU embeddings are float32 in trimask). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import checkpoint_factory  # noqa: E402  (also installs the torchvision stand-in)

from trimask.embedder import Embedder, resolve_device  # noqa: E402
from trimask.preprocess import apply_coords, get_preprocess_shape  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def agreement_images() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled photos (no download); noise if scikit-image is missing."""
    images: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data

        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            images.append((name, np.asarray(getattr(skimage.data, name)())[..., :3].astype(np.uint8)))
    except ImportError:
        pass
    if not images:
        rng = np.random.default_rng(0)
        images.append(("noise", rng.integers(0, 256, size=(600, 800, 3), dtype=np.uint8)))
    return images


@torch.inference_mode()
def decoded_masks(embedder: Embedder, embedding: np.ndarray, points: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """Boolean masks P x 4 x H x W for P single foreground points (image pixels), float32 decoder."""
    sam = embedder.sam
    device = embedder.device
    coords = torch.as_tensor(apply_coords(points, hw), dtype=torch.float32, device=device)[:, None, :]
    labels = torch.ones(len(points), 1, dtype=torch.float32, device=device)
    emb = torch.as_tensor(embedding, dtype=torch.float32, device=device)
    low_res, _ = sam.decode(emb, point_coords=coords, point_labels=labels)
    input_size = get_preprocess_shape(*hw)
    return sam.postprocess_masks(low_res, input_size, hw) > 0


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: ... x H x W bool -> ... IoU (NaN where both are empty)."""
    inter = (a & b).flatten(-2).sum(-1).double()
    union = (a | b).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, float("nan")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", help="vit_h, vit_l, vit_b, vit_t or tiny (default: vit_b)")
    parser.add_argument("--checkpoint", default=None, help="official weights (default: random official-format)")
    parser.add_argument("--dtypes", default="bf16,fp16", help="reduced precisions to compare (default: bf16,fp16)")
    parser.add_argument("--prompts", type=int, default=32, help="random point prompts per image (default: 32)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cuda":
        # The reference must be true float32, not TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        random_init = False
        if checkpoint is None and args.model == "tiny":
            random_init = True
        elif checkpoint is None:
            checkpoint = checkpoint_factory.make_official_checkpoint(args.model, Path(tmp) / "weights.pth")
        reference = Embedder(args.model, checkpoint, device=device, dtype=torch.float32, random_init=random_init)
        images = agreement_images()
        rng = np.random.default_rng(0)
        fp32 = {name: reference.embed_image(image) for name, image in images}

        rows = []
        for label in [d for d in args.dtypes.split(",") if d]:
            if label == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                print("note: this GPU has no bf16; skipped", file=sys.stderr)
                continue
            reduced = Embedder(args.model, checkpoint, device=device, dtype=DTYPES[label],
                               random_init=random_init, sam=reference.sam)
            cosines, ious = [], []
            for name, image in images:
                emb = reduced.embed_image(image)
                a, b = emb.ravel().astype(np.float64), fp32[name].ravel().astype(np.float64)
                cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
                h, w = image.shape[:2]
                points = rng.uniform([0, 0], [w, h], size=(args.prompts, 2))
                values = iou(decoded_masks(reference, fp32[name], points, (h, w)),
                             decoded_masks(reference, emb, points, (h, w)))
                ious += [v for v in values.flatten().tolist() if v == v]
                print(f"  {label} {name}: cosine {cosines[-1]:.6f}", file=sys.stderr)
            ious_sorted = sorted(ious)
            rows.append({
                "dtype": f"{label} autocast",
                "cosine min": f"{min(cosines):.5f}",
                "cosine mean": f"{statistics.fmean(cosines):.5f}",
                "mask IoU mean": f"{statistics.fmean(ious):.4f}",
                "mask IoU p5": f"{ious_sorted[int(0.05 * (len(ious_sorted) - 1))]:.4f}",
                "mask IoU min": f"{ious_sorted[0]:.4f}",
            })

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    weights = args.checkpoint or "random official-format weights"
    print(f"{args.model} on {name}, {len(images)} images x {args.prompts} point prompts x 4 tokens; "
          f"weights: {weights}; reference: fp32 (TF32 off) on the same device.\n")
    columns = list(rows[0]) if rows else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(" --- " for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
