"""``trimask embed``: SAM image embeddings of image files, written as .npy and kept in the server's cache."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trimask.errors import TrimaskError

# Spelled out rather than imported so ``trimask --help`` does not import torch.
MODEL_CHOICES = ("tiny", "vit_h", "vit_l", "vit_b", "vit_t")

DESCRIPTION = """\
Compute the SAM image embedding of each IMAGE and write it to OUT/<image stem>.npy
(float32, shape [1, 256, 64, 64]). A folder given as IMAGE stands for the image
files under it (JPEG, PNG, TIFF, WebP, BMP; recursively).

Embeddings are also kept in the cache that `trimask serve` reads (by default
<annotations>/.cache/embeddings), so a later annotation session starts without
waiting for the encoder; images already in the cache are not computed again.
With the cache, the .npy files hold the cached float16 values (what the browser
receives) as float32; --no-cache writes the encoder's exact float32 output.

A file that cannot be read as an image is reported on one line of stderr and
skipped; the others are still embedded, and the exit status is then 1.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="compute SAM image embeddings of image files (.npy) and fill the cache",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the <stem>.npy files (created if missing)")
    parser.add_argument("--model", default="tiny", choices=MODEL_CHOICES,
                        help="SAM model (default: tiny, the embedded default model)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="official checkpoint file for --model (not needed for tiny)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the encoder runs (default: auto, CUDA when present)")
    parser.add_argument("--annotations", default="annotations", metavar="DIR",
                        help="the annotations folder of `trimask serve`, whose cache to fill (default: ./annotations)")
    caching = parser.add_mutually_exclusive_group()
    caching.add_argument("--cache", default=None, metavar="DIR",
                         help="cache folder, as CACHE_DIR of the server (default: <annotations>/.cache); "
                         "embeddings go to DIR/embeddings")
    caching.add_argument("--no-cache", action="store_true",
                         help="neither read nor fill the cache; write the exact float32 output")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="images per encoder call (default: 4 on CUDA, 1 on CPU)")
    parser.set_defaults(func=run)


def collect_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` in order: files as given, folders expanded (sorted,
    recursive, by suffix), duplicates dropped. Raises TrimaskError for a missing path, an empty
    folder, or two images that would write the same <stem>.npy."""
    from trimask.image_io import is_image_file

    paths: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise TrimaskError(f"No image files (JPEG, PNG, TIFF, WebP, BMP) found in the folder {path}.")
        elif path.exists():
            found = [path]
        else:
            raise TrimaskError(f"Image file not found: {path}.")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    by_stem: dict[str, Path] = {}
    for p in paths:
        if p.stem in by_stem:
            raise TrimaskError(
                f"{by_stem[p.stem]} and {p} would both be written to {p.stem}.npy; "
                "embed them into different --out folders."
            )
        by_stem[p.stem] = p
    return paths


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from trimask.embedder import Embedder
    from trimask.embedding_cache import EmbeddingCache, save_npy_atomic

    if args.batch_size is not None and args.batch_size < 1:
        raise TrimaskError("--batch-size must be at least 1.")
    paths = collect_images(args.images)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrimaskError(f"Cannot create the output folder {out}: {exc.strerror or exc}.") from None
    cache = None
    if not args.no_cache:
        cache_dir = Path(args.cache) if args.cache else Path(args.annotations) / ".cache"
        cache = EmbeddingCache(cache_dir / "embeddings")

    embedder = Embedder(args.model, args.checkpoint, device=args.device, cache=cache, batch_size=args.batch_size)
    failures = 0
    with tqdm(total=len(paths), unit="image", desc=f"embedding ({embedder.identity}, {embedder.device})",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(paths), embedder.batch_size):
            group = paths[start : start + embedder.batch_size]
            for path, result in zip(group, embedder.embed_files(group)):
                if isinstance(result, TrimaskError):
                    failures += 1
                    tqdm.write(f"trimask embed: error: {result}", file=sys.stderr)
                else:
                    save_npy_atomic(out / f"{path.stem}.npy", np.ascontiguousarray(result, dtype=np.float32))
                bar.update(1)
    return 1 if failures else 0
