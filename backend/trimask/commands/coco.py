"""``trimask export-coco`` and ``trimask import-coco``: the annotations database as COCO, both ways."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trimask.errors import TrimaskError


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export-coco",
        help="write the annotations as a COCO instance-segmentation file",
        description="Write every image and annotation of the annotations folder as a COCO file "
        "(segmentation as compressed RLE, area, bbox, iscrowd 0, score), readable by "
        "pycocotools.coco.COCO and usable as COCOeval results.",
    )
    export.add_argument("--annotations", default="annotations", metavar="DIR",
                        help="the annotations folder of `trimask serve` (default: ./annotations)")
    export.add_argument("--images", default=None, metavar="DIR",
                        help="scan this images folder first, so images without annotations are listed too")
    export.add_argument("--out", required=True, metavar="FILE", help="the COCO JSON file to write")
    export.set_defaults(func=run_export)

    imp = subparsers.add_parser(
        "import-coco",
        help="add the annotations of a COCO file (RLE or polygons) to the annotations folder",
        description="Import a COCO instance-segmentation file: images are matched to the folder's "
        "images by file name (base name as a fallback), categories merged by name, masks given as "
        "RLE or polygons. Images not in the folder are skipped with a warning; importing the same "
        "file twice adds nothing.",
    )
    imp.add_argument("file", metavar="FILE", help="the COCO JSON file")
    imp.add_argument("--images", default=None, metavar="DIR",
                     help="the images folder (needed unless `trimask serve` has already scanned it)")
    imp.add_argument("--annotations", default="annotations", metavar="DIR",
                     help="the annotations folder (default: ./annotations)")
    imp.set_defaults(func=run_import)


def _open(annotations: str, images: str | None, *, create: bool):
    from trimask.service import storage
    from trimask.service.image_index import build_index

    folder = Path(annotations)
    db_file = storage.db_path(folder)
    if not db_file.is_file() and not (create and images):
        raise TrimaskError(
            f"no trimask database in {folder} ({db_file.name} is missing); pass --annotations DIR"
            + (" and --images DIR" if create else "")
            + "."
        )
    conn = storage.connect(db_file)
    if images:
        build_index(Path(images), conn, exclude=[folder])
    return conn


def run_export(args: argparse.Namespace) -> int:
    from trimask.coco_export import export_coco

    conn = _open(args.annotations, args.images, create=False)
    try:
        summary, data = export_coco(conn, Path(args.out))
    finally:
        conn.close()
    print(
        f"wrote {summary.images} images, {summary.annotations} annotations and "
        f"{summary.categories} categories to {args.out} ({len(data) / 1e6:.1f} MB)"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    from trimask.coco_import import import_coco, load_coco_file

    coco = load_coco_file(Path(args.file))
    conn = _open(args.annotations, args.images, create=True)
    try:
        report = import_coco(conn, coco)
    finally:
        conn.close()
    for warning in report.warnings:
        print(f"trimask import-coco: warning: {warning}", file=sys.stderr)
    print(report.summary())
    return 0
