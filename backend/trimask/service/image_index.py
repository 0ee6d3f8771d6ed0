"""The folder of images the annotator works on: a recursive scan with stable integer ids.

Ids live in the database (table ``images``, keyed by the path relative to the
folder), so an image keeps its id across restarts and when other files are added
or removed; new files get the next ids in listing order. Width and height are
those after EXIF orientation, read from the header once and re-read only when the
file's mtime or size changes.

Requests only ever name an image by id; the path served is the one found by the
scan, so no path from a request reaches the file system.
"""
from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trimask.errors import TrimaskError
from trimask.service import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One image of the folder. ``file_name`` is relative to the folder, '/'-separated."""

    id: int
    file_name: str
    width: int
    height: int
    path: Path


def natural_key(name: str) -> list[object]:
    """Sort key so that ``img2`` comes before ``img10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def scan_folder(root: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``root`` (recursively), in natural order of their relative paths.

    Hidden files and folders (name starting with '.') and the folders in
    ``exclude`` (e.g. the annotations folder when it sits inside) are skipped.
    Symlinked folders are not followed, so a link loop cannot hang the scan.
    """
    from trimask.image_io import is_image_file

    root = Path(root)
    if not root.is_dir():
        raise TrimaskError(f"the images folder {root} does not exist or is not a folder.")
    excluded = {p.resolve() for p in exclude if p.exists()}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        ]
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                found.append(here / name)
    found.sort(key=lambda p: natural_key(p.relative_to(root).as_posix()))
    return found


class ImageIndex:
    """The images of one folder, in listing order, looked up by id."""

    def __init__(self, root: Path, records: list[ImageRecord]):
        self.root = Path(root)
        self.records = records
        self._by_id = {r.id: r for r in records}
        self._position = {r.id: i for i, r in enumerate(records)}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, image_id: int) -> ImageRecord:
        record = self._by_id.get(image_id)
        if record is None:
            raise storage.NotFoundError(f"there is no image with id {image_id}.")
        return record

    def following(self, image_id: int, count: int) -> list[ImageRecord]:
        """The ``count`` images listed after ``image_id`` (for background precomputation)."""
        i = self._position.get(image_id)
        if i is None:
            return []
        return self.records[i + 1 : i + 1 + count]

    def by_file_name(self) -> dict[str, ImageRecord]:
        return {r.file_name: r for r in self.records}


def build_index(root: Path, conn: sqlite3.Connection, exclude: Iterable[Path] = ()) -> ImageIndex:
    """Scan ``root``, register new or changed files in the database, and return the index.

    Files that cannot be read as images are skipped with a warning, so one bad
    file does not keep the annotator from starting.
    """
    from trimask.image_io import image_size

    from tqdm import tqdm

    root = Path(root)
    paths = scan_folder(root, exclude)
    known = storage.image_stats(conn)
    scanned: list[storage.ImageFile] = []
    # Reading sizes is the slow part of a first scan of a large folder: show it.
    progress = tqdm(paths, desc="reading image sizes", unit="image", disable=len(paths) - len(known) < 500)
    for path in progress:
        rel = path.relative_to(root).as_posix()
        try:
            st = path.stat()
            old = known.get(rel)
            if old is not None and old[3] == st.st_mtime_ns and old[4] == st.st_size:
                width, height = old[1], old[2]
            else:
                width, height = image_size(path)
        except (TrimaskError, OSError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        scanned.append(storage.ImageFile(rel, int(width), int(height), st.st_mtime_ns, st.st_size))
    changed = [
        f for f in scanned
        if (old := known.get(f.file_name)) is None or old[1:] != (f.width, f.height, f.mtime_ns, f.file_size)
    ]
    ids = storage.upsert_images(conn, changed) if changed else {k: v[0] for k, v in known.items()}
    records = [ImageRecord(ids[f.file_name], f.file_name, f.width, f.height, root / f.file_name) for f in scanned]
    return ImageIndex(root, records)
