"""Per-image embedding time of each model on this machine, and the ratio to the official code.

For each model, both implementations get the same random official-format
weights (every parameter perturbed, see tests/checkpoint_factory.py) and the
same photo, and run in this process under the same thread settings:

- ``trimask``: ``Embedder.embed_image`` (resize + normalize + encoder; on CUDA
  bf16 autocast, fp16 where bf16 is missing);
- ``official``: ``SamPredictor.set_image`` of segment-anything (vit_b/l/h) or
  MobileSAM (vit_t), fp32, which does the same work.

Runs alternate between the two (so a busy machine slows both alike); the
table gives the median of ``--runs`` timed runs after one warm-up, the ratio
trimask / official (below 1: trimask is faster) and the relative L2
difference of the embeddings. ``tiny`` (its bundled weights) has no official counterpart. On CUDA
a ``batched`` column gives trimask's per-image time with ``embed_batch``.

    .venv/bin/python bench/embed.py [--models tiny,vit_t,vit_b] [--vit-l] [--vit-h]
                                    [--runs 5] [--device auto] [--threads N]

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # checkpoint_factory: official-format random weights

import checkpoint_factory  # noqa: E402  (also installs the torchvision stand-in)

from trimask.embedder import Embedder, available_cores, resolve_device  # noqa: E402


def bench_image(height: int = 1200, width: int = 1600) -> np.ndarray:
    """A photo (scikit-image's astronaut, upscaled) so the resize does real work; noise if unavailable."""
    try:
        import skimage.data
        from PIL import Image

        photo = Image.fromarray(skimage.data.astronaut())
        return np.asarray(photo.resize((width, height), Image.BICUBIC))
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def official_predictor(model_type: str, checkpoint: Path, device: torch.device):
    """The official SamPredictor (MobileSAM's for vit_t) over the official model with these weights."""
    model = checkpoint_factory.reference_model(model_type, checkpoint).to(device)
    if model_type == "vit_t":
        from mobile_sam import SamPredictor
    else:
        from segment_anything import SamPredictor
    return SamPredictor(model)


def bench_model(model_type: str, image: np.ndarray, args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    device = resolve_device(args.device)
    reference = None
    if model_type == "tiny":
        # The bundled weights: their checkpoint says the encoder's layout (e.g. its pattern head).
        embedder = Embedder("tiny", device=device, num_threads=args.threads)
    else:
        if model_type == "vit_t" and not checkpoint_factory.mobile_sam_available():
            print("note: MobileSAM (pip: mobilesam-mirror) not installed; vit_t has no reference", file=sys.stderr)
            checkpoint = None
        else:
            checkpoint = checkpoint_factory.make_official_checkpoint(model_type, workdir / f"{model_type}.pth")
        embedder = Embedder(model_type, checkpoint, device=device, num_threads=args.threads)
        if checkpoint is not None:
            reference = official_predictor(model_type, checkpoint, device)

    ours_out: list[np.ndarray] = []
    ref_out: list[np.ndarray] = []

    def run_ours() -> None:
        ours_out[:] = [embedder.embed_image(image)]

    def run_reference() -> None:
        reference.set_image(image)
        ref_out[:] = [reference.get_image_embedding().float().cpu().numpy()]

    ours_times: list[float] = []
    ref_times: list[float] = []
    for i in range(args.runs + 1):  # run 0 warms up (allocations, kernel choice)
        t = timed(run_ours, device)
        if i:
            ours_times.append(t)
        if reference is not None:
            t = timed(run_reference, device)
            if i:
                ref_times.append(t)
        print(f"  {model_type} run {i}/{args.runs}", file=sys.stderr)

    row = {
        "model": model_type,
        "trimask (s)": f"{statistics.median(ours_times):.3f}",
        "official (s)": "—",
        "ratio": "—",
        "rel. L2 diff": "—",
    }
    if reference is not None:
        ours_median, ref_median = statistics.median(ours_times), statistics.median(ref_times)
        diff = np.linalg.norm(ours_out[0] - ref_out[0]) / np.linalg.norm(ref_out[0])
        row.update({"official (s)": f"{ref_median:.3f}", "ratio": f"{ours_median / ref_median:.2f}",
                    "rel. L2 diff": f"{diff:.1e}"})
    if device.type == "cuda":
        batch = [image] * (embedder.batch_size * 2)
        times = [timed(lambda: embedder.embed_batch(batch), device) for _ in range(args.runs + 1)][1:]
        row["batched (s/img)"] = f"{statistics.median(times) / len(batch):.4f}"
    return row


def markdown(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(row.get(c, "—") for c in columns) + " |")
    return "\n".join(lines)


def describe_device(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return f"{torch.cuda.get_device_name(device)} (trimask {dtype} autocast, official fp32)"
    return f"CPU: {cpu_name()}, {threads} threads, fp32"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit_t,vit_b", help="comma-separated (default: tiny,vit_t,vit_b)")
    parser.add_argument("--vit-l", action="store_true", help="also vit_l (slow on CPU)")
    parser.add_argument("--vit-h", action="store_true", help="also vit_h (slow on CPU)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per implementation (default: 5)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    parser.add_argument("--size", default="1200x1600", help="image H x W (default: 1200x1600)")
    args = parser.parse_args(argv)

    models = [m for m in args.models.split(",") if m]
    models += [m for m, flag in (("vit_l", args.vit_l), ("vit_h", args.vit_h)) if flag and m not in models]
    height, width = (int(v) for v in args.size.lower().split("x"))
    image = bench_image(height, width)
    device = resolve_device(args.device)
    threads = args.threads or available_cores()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in models:
            with torch.random.fork_rng(devices=[]):
                rows.append(bench_model(model_type, image, args, Path(tmp)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Embedding one {width}x{height} image, median of {args.runs} runs; {describe_device(device, threads)}; "
          f"torch {torch.__version__}; load average at the end {load:.1f}. "
          "ratio = trimask / official time (< 1: trimask faster).\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
