"""``trimask samples``: write the sample images the annotator starts on.

Generated scenes (objects made of parts made of subparts, the same generator
the embedded model was trained on, from held-out seeds) and a few freely
licensed photos that scikit-image ships with its data module.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from trimask.errors import TrimaskError

# Photos bundled inside scikit-image's wheel (no download): public domain or
# CC0/CC-BY as listed in skimage.data's documentation.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
SCENE_SEED_BASE = 900_000  # far from the training seeds


def write_photos(out: Path) -> list[Path]:
    try:
        import skimage.data
    except ImportError:
        return []
    written = []
    for name in SKIMAGE_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        path = out / f"photo_{name}.jpg"
        Image.fromarray(image).convert("RGB").save(path, quality=92)
        written.append(path)
    return written


def write_scenes(out: Path, count: int, size: int) -> list[Path]:
    from trimask.training.scenes import generate_scene

    written = []
    for i in range(count):
        scene = generate_scene(SCENE_SEED_BASE + i, size=size)
        path = out / f"scene_{i:02d}.png"
        Image.fromarray(scene.image).save(path)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrimaskError(f"cannot create the folder {out}: {exc.strerror}") from exc
    paths = write_scenes(out, args.scenes, args.size) + write_photos(out)
    (out / ".complete").write_text("\n".join(p.name for p in paths) + "\n")
    print(f"wrote {len(paths)} sample images to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "samples",
        help="write sample images (generated scenes and a few photos)",
        description="Write sample images to annotate: generated scenes of objects made of "
        "parts made of subparts, and the freely licensed photos bundled with scikit-image.",
    )
    parser.add_argument("--out", required=True, help="folder to write the images into")
    parser.add_argument("--scenes", type=int, default=6, help="number of generated scenes (default 6)")
    parser.add_argument("--size", type=int, default=768, help="side of the square scenes in pixels (default 768)")
    parser.set_defaults(func=run)
