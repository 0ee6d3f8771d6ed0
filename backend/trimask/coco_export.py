"""The annotations database as a COCO instance-segmentation file.

The file loads with ``pycocotools.coco.COCO`` as it is and doubles as a results
file for ``COCOeval`` (``coco.loadRes(data["annotations"])``):

- ``images``: ``id``, ``file_name`` (relative to the images folder), ``width``, ``height``;
- ``categories``: ``id``, ``name``, ``supercategory`` (and trimask's ``color``);
- ``annotations``: ``id``, ``image_id``, ``category_id``, ``segmentation`` as compressed
  RLE ``{"size": [h, w], "counts": str}``, ``area`` and ``bbox`` as pycocotools
  computes them, ``iscrowd`` 0, ``score`` (the predicted IoU; 1.0 when the mask came
  without one, e.g. imported, since COCOeval needs a score on every result) and
  trimask's ``level``.

Images are every image the database knows (the server registers them when it
scans the folder), with or without annotations.
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimask.errors import TrimaskError
from trimask.service import storage

COCO_FILENAME = "coco.json"


@dataclass(frozen=True)
class ExportSummary:
    """How much an export holds."""

    images: int
    categories: int
    annotations: int


def _annotation_json(row: sqlite3.Row) -> str:
    """One annotation as compact JSON, written directly: at 100k annotations building dicts and
    running the generic encoder costs several times more. Equal to ``json.dumps`` of the
    COCO fields (``storage.coco_annotation``); the tests hold the two to that."""
    # Counts use characters 48..111: of those only the backslash needs escaping in JSON.
    counts = row["counts"].replace("\\", "\\\\")
    score = row["score"]
    level = row["level"]
    return (
        f'{{"id":{row["id"]},"image_id":{row["image_id"]},"category_id":{row["category_id"]},'
        f'"segmentation":{{"size":[{row["height"]},{row["width"]}],"counts":"{counts}"}},'
        f'"area":{row["area"]},"bbox":{_compact(row["bbox"])},"iscrowd":0,'
        f'"score":{float(score) if score is not None else 1.0!r},'
        f'"level":{json.dumps(level) if level is not None else "null"}}}'
    )


def _compact(json_text: str) -> str:
    return json_text.replace(" ", "")  # stored bbox lists of numbers: no strings, so spaces are separators


def coco_bytes(conn: sqlite3.Connection) -> tuple[ExportSummary, bytes]:
    """The COCO file of everything in the database, from one consistent snapshot, as UTF-8 JSON."""
    conn.execute("BEGIN")  # a read transaction: images and annotations from the same moment
    try:
        images = [
            {"id": r["id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
            for r in storage.list_images(conn)
        ]
        categories = storage.list_categories(conn)
        annotations = [
            _annotation_json(row)
            for row in conn.execute(
                "SELECT id, image_id, category_id, height, width, counts, area, bbox, score, level "
                "FROM annotations ORDER BY id"
            )
        ]
    finally:
        conn.execute("COMMIT")
    info = {
        "description": "exported by trimask",
        "version": "1.0",
        "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    text = (
        f'{{"info":{json.dumps(info, **compact)},"licenses":[],"images":{json.dumps(images, **compact)},'
        f'"categories":{json.dumps(categories, **compact)},"annotations":[{",".join(annotations)}]}}'
    )
    return ExportSummary(len(images), len(categories), len(annotations)), text.encode("utf-8")


def build_coco(conn: sqlite3.Connection) -> dict[str, Any]:
    """The COCO file of the database as a dict."""
    return json.loads(coco_bytes(conn)[1])


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise TrimaskError(f"cannot write {path}: {exc.strerror or exc}.") from exc


def export_coco(conn: sqlite3.Connection, out: Path) -> tuple[ExportSummary, bytes]:
    """Write the COCO file of the database atomically to ``out``; returns what it holds and its bytes."""
    summary, data = coco_bytes(conn)
    write_atomic(out, data)
    return summary, data
