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
from pathlib import Path
from typing import Any

from trimask.errors import TrimaskError
from trimask.service import storage

COCO_FILENAME = "coco.json"


def build_coco(conn: sqlite3.Connection) -> dict[str, Any]:
    """The COCO dict of everything in the database (one consistent snapshot)."""
    conn.execute("BEGIN")  # a read transaction: images and annotations from the same moment
    try:
        images = [
            {"id": r["id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
            for r in storage.list_images(conn)
        ]
        categories = storage.list_categories(conn)
        annotations = []
        for row in conn.execute(
            "SELECT id, image_id, category_id, height, width, counts, area, bbox, score, level "
            "FROM annotations ORDER BY id"
        ):
            ann = storage.coco_annotation(row)
            if ann["score"] is None:
                ann["score"] = 1.0  # COCOeval sorts results by score: every one needs a number
            annotations.append(ann)
    finally:
        conn.execute("COMMIT")
    return {
        "info": {
            "description": "exported by trimask",
            "version": "1.0",
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "licenses": [],
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }


def coco_bytes(coco: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (100k annotations stay a few tens of MB)."""
    return json.dumps(coco, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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


def export_coco(conn: sqlite3.Connection, out: Path) -> tuple[dict[str, Any], bytes]:
    """Build the COCO file from the database and write it atomically to ``out``; returns (dict, bytes)."""
    coco = build_coco(conn)
    data = coco_bytes(coco)
    write_atomic(out, data)
    return coco, data
