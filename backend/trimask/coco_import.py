"""COCO instance-segmentation files into the annotations database, so work from another tool continues here.

- Images are matched to the folder's images by ``file_name``: the relative path
  first, then the base name when exactly one image of the folder has it. Images
  that match nothing are skipped (their annotations counted and named in a warning).
- An image whose width/height in the file differ from the folder's (after EXIF
  orientation) is skipped too: its masks would not line up.
- Segmentations: RLE with compressed or uncompressed counts (validated like any
  client mask) and polygons (rasterized with pycocotools at the image's size).
- Categories are merged by name; new names are created.
- An annotation identical to one already stored (same image, category and mask)
  is skipped, so importing the same file twice adds nothing.
- Everything is one transaction: an import is applied whole or not at all.
"""
from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from trimask.errors import TrimaskError
from trimask.service import rle, storage

@dataclass
class ImportReport:
    """What an import did, for the one-paragraph summary the CLI prints."""

    images_matched: int = 0
    images_unmatched: list[str] = field(default_factory=list)
    images_size_mismatch: list[str] = field(default_factory=list)
    annotations_imported: int = 0
    annotations_duplicate: int = 0
    annotations_skipped_image: int = 0
    annotations_invalid: int = 0
    categories_created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"imported {self.annotations_imported} annotations onto {self.images_matched} images",
            f"created {len(self.categories_created)} categories",
        ]
        if self.annotations_duplicate:
            parts.append(f"{self.annotations_duplicate} already present")
        if self.annotations_skipped_image:
            parts.append(f"{self.annotations_skipped_image} skipped (image not in the folder or of another size)")
        if self.annotations_invalid:
            parts.append(f"{self.annotations_invalid} skipped as invalid")
        return "; ".join(parts)


def load_coco_file(path: Path) -> dict[str, Any]:
    """Read and sanity-check a COCO JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrimaskError(f"COCO file not found: {path}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrimaskError(f"cannot read the COCO file {path}: {exc}.") from None
    except ValueError as exc:
        raise TrimaskError(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise TrimaskError(f'{path} is not a COCO file: it needs "images" and "annotations" lists.')
    if not isinstance(data.get("categories", []), list):
        raise TrimaskError(f'{path} is not a COCO file: "categories" must be a list.')
    return data


def _normalize_name(name: str) -> str:
    """'./a\\b.jpg' -> 'a/b.jpg': COCO files from Windows tools use backslashes."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def match_images(
    coco_images: list[Any], ours: list[sqlite3.Row], report: ImportReport
) -> dict[Any, tuple[int, int, int]]:
    """COCO image id -> (our image id, height, width) for the images that match by name and size."""
    by_path = {r["file_name"]: r for r in ours}
    by_base: dict[str, list[sqlite3.Row]] = {}
    for r in ours:
        by_base.setdefault(PurePosixPath(r["file_name"]).name, []).append(r)
    mapping: dict[Any, tuple[int, int, int]] = {}
    for img in coco_images:
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            report.warnings.append("an image entry without an id or file_name was ignored")
            continue
        name = _normalize_name(img["file_name"])
        row = by_path.get(name)
        if row is None:
            candidates = by_base.get(PurePosixPath(name).name, [])
            row = candidates[0] if len(candidates) == 1 else None
        if row is None:
            report.images_unmatched.append(img["file_name"])
            continue
        w, h = img.get("width"), img.get("height")
        if (w is not None and w != row["width"]) or (h is not None and h != row["height"]):
            report.images_size_mismatch.append(
                f"{img['file_name']} ({w}x{h} in the file, {row['width']}x{row['height']} in the folder)"
            )
            continue
        mapping[img["id"]] = (row["id"], row["height"], row["width"])
    report.images_matched = len(mapping)
    return mapping


def _segmentation_to_rle(seg: Any, height: int, width: int) -> rle.NormalizedRle:
    if isinstance(seg, dict):
        return rle.normalize_rle(seg, (height, width))
    if isinstance(seg, list):
        return rle.rle_from_polygons(seg, height, width)
    raise TrimaskError("the segmentation is neither an RLE object nor a list of polygons.")


def import_coco(conn: sqlite3.Connection, coco: dict[str, Any]) -> ImportReport:
    """Import a COCO dict (see the module docstring) into the database the connection opens."""
    report = ImportReport()
    ours = storage.list_images(conn)
    if not ours:
        raise TrimaskError("the annotations database knows no images yet; pass --images DIR to scan the folder.")
    images = match_images(coco["images"], ours, report)

    # Categories by name: COCO id -> name, for those the annotations can use.
    coco_categories: dict[Any, str] = {}
    for cat in coco.get("categories", []):
        if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str) and cat["name"].strip():
            coco_categories[cat["id"]] = cat["name"].strip()

    prepared: list[tuple[str, storage.AnnotationFields]] = []
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            report.annotations_invalid += 1
            continue
        target = images.get(ann.get("image_id"))
        if target is None:
            report.annotations_skipped_image += 1
            continue
        name = coco_categories.get(ann.get("category_id"))
        if name is None:
            report.annotations_invalid += 1
            continue
        image_id, height, width = target
        try:
            mask = _segmentation_to_rle(ann.get("segmentation"), height, width)
        except TrimaskError as exc:
            report.annotations_invalid += 1
            if len(report.warnings) < 20:
                report.warnings.append(f"annotation {ann.get('id')!r}: {exc}")
            continue
        score = ann.get("score")
        score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) else None
        level = ann.get("level") if ann.get("level") in storage.LEVELS else None
        fields = storage.AnnotationFields(
            image_id=image_id, category_id=0, height=mask.height, width=mask.width, counts=mask.counts,
            area=mask.area, bbox=mask.bbox, score=score, level=level, prompt=None,
        )
        prepared.append((name, fields))

    with storage.transaction(conn):
        category_ids: dict[str, int] = {c["name"]: c["id"] for c in storage.list_categories(conn)}
        existing = {
            (r[0], r[1], r[2]) for r in conn.execute("SELECT image_id, category_id, counts FROM annotations")
        }
        for name, fields in prepared:
            if name not in category_ids:
                category_ids[name] = storage.insert_category_row(conn, name, storage.default_color(conn), "")["id"]
                report.categories_created.append(name)
            cid = category_ids[name]
            key = (fields.image_id, cid, fields.counts)
            if key in existing:
                report.annotations_duplicate += 1
                continue
            existing.add(key)
            storage.insert_annotation_row(conn, replace(fields, category_id=cid))
            report.annotations_imported += 1
    if report.images_unmatched:
        shown = ", ".join(report.images_unmatched[:5]) + (" ..." if len(report.images_unmatched) > 5 else "")
        report.warnings.insert(0, f"{len(report.images_unmatched)} image(s) of the file are not in the folder: {shown}")
    if report.images_size_mismatch:
        report.warnings.insert(0, "image size differs, skipped: " + "; ".join(report.images_size_mismatch[:5]))
    return report
