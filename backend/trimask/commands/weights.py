"""``trimask weights``: the official weight files, which are present, and verification of a file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trimask.errors import TrimaskError
from trimask.weights_table import (
    OFFICIAL_WEIGHTS,
    by_file_name,
    by_sha256,
    default_weights_dir,
    presence,
)

# Spelled out rather than imported so ``trimask --help`` does not import torch.
MODEL_CHOICES = ("vit_h", "vit_l", "vit_b", "vit_t", "tiny")

DESCRIPTION = """\
List the official SAM / MobileSAM checkpoint files (size, sha256, download URL) and
say which are present in DIR (default: $TRIMASK_WEIGHTS or ~/.cache/trimask).

With --verify FILE: check FILE's size and sha256 against the table (matched by file
name or by hash), then load it strictly as the model type it claims (--model, else
the table's type, else the type its keys look like). Exit status 1 if any check fails.
trimask never downloads weights itself.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list the official weight files, which are present, and verify one",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="folder holding weight files (default: $TRIMASK_WEIGHTS or ~/.cache/trimask)")
    parser.add_argument("--verify", default=None, metavar="FILE", help="a checkpoint file to verify")
    parser.add_argument("--model", default=None, choices=MODEL_CHOICES,
                        help="with --verify: the model type the file should load as")
    parser.set_defaults(func=run)


def _size(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:,.1f} MB"


def list_weights(directory: Path) -> None:
    print(f"Official weights (folder: {directory}):")
    for entry in OFFICIAL_WEIGHTS:
        print(f"  {entry.model_type:6} {entry.file_name:22} {_size(entry.size_bytes):>11}  "
              f"[{presence(entry, directory)}]")
        print(f"         sha256 {entry.sha256 or 'unknown'}")
        print(f"         {entry.url}")
        print(f"         {entry.description}")
    print("The 'tiny' model needs no download: its weights ship with trimask.")


def verify(path: Path, model_type: str | None) -> list[str]:
    """Check a file; returns report lines on success, raises TrimaskError on the first failure."""
    from tqdm import tqdm

    from trimask.models.build import build_sam, guess_model_type, read_checkpoint, sha256_file

    if not path.is_file():
        raise TrimaskError(f"Checkpoint file not found: {path}.")
    size = path.stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", file=sys.stderr,
              leave=False) as bar:
        digest = sha256_file(path, progress=bar.update)
    lines = [f"{path}: {size:,} bytes, sha256 {digest}"]
    entry = by_sha256(digest) or by_file_name(path.name)
    if entry is not None:
        if entry.sha256 is not None and digest != entry.sha256:
            raise TrimaskError(
                f"{path} is named like the official {entry.file_name} but its sha256 differs "
                f"(expected {entry.sha256}); the file is damaged or not the official one."
            )
        if entry.size_bytes is not None and size != entry.size_bytes:
            raise TrimaskError(f"{path} has {size:,} bytes; the official {entry.file_name} has {entry.size_bytes:,}.")
        known = "matches" if entry.sha256 else "has the size of (sha256 unknown)"
        lines.append(f"{known} the official {entry.file_name} ({entry.model_type})")
    else:
        lines.append("not one of the official files (unknown name and hash)")
    claimed = model_type or (entry.model_type if entry is not None else None)
    if claimed is None:
        state_dict, _ = read_checkpoint(path)
        claimed = guess_model_type(state_dict)
        if claimed is None:
            raise TrimaskError(f"{path} does not look like any trimask model type; give --model to see why.")
    if entry is not None and model_type is not None and entry.model_type != model_type:
        raise TrimaskError(f"{path} is the official {entry.model_type} file, not {model_type}.")
    build_sam(claimed, path)
    lines.append(f"loads strictly as {claimed}")
    return lines


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir).expanduser() if args.dir else default_weights_dir()
    if args.verify is None:
        if args.model is not None:
            raise TrimaskError("--model only applies with --verify FILE.")
        list_weights(directory)
        return 0
    for line in verify(Path(args.verify).expanduser(), args.model):
        print(line)
    print("OK")
    return 0
