"""COCO import: RLE (both forms) and polygons, matched by file name, categories merged by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from service_helpers import make_images
from trimask.cli import main as cli_main
from trimask.coco_import import import_coco, load_coco_file
from trimask.errors import TrimaskError
from trimask.service import rle, storage
from trimask.service.image_index import build_index


@pytest.fixture
def conn(tmp_path):
    images = make_images(tmp_path / "images")
    c = storage.connect(tmp_path / "annotations" / storage.DB_FILENAME)
    build_index(images, c)
    yield c
    c.close()


def _mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _foreign_coco() -> dict:
    """A file from another tool: its own ids, a Windows path, a basename-only path, an unknown image."""
    a = _mask(30, 40, 2, 12, 5, 25)
    b = _mask(16, 24, 1, 9, 2, 10)
    runs_b = rle.decode_counts_string(rle.encode_mask(b)["counts"], b.size)
    return {
        "images": [
            {"id": 101, "file_name": ".\\a.png", "width": 40, "height": 30},
            {"id": 102, "file_name": "elsewhere/b.jpg", "width": 24, "height": 16},
            {"id": 103, "file_name": "not_here.png", "width": 10, "height": 10},
            {"id": 104, "file_name": "c.png", "width": 9, "height": 8},  # another size: masks would not line up
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 101, "category_id": 7, "segmentation": rle.encode_mask(a), "iscrowd": 0,
             "score": 0.8},
            {"id": 2, "image_id": 102, "category_id": 8, "segmentation": {"size": [16, 24], "counts": runs_b},
             "iscrowd": 1},
            {"id": 3, "image_id": 101, "category_id": 8,
             "segmentation": [[30.0, 20.0, 38.0, 20.0, 38.0, 28.0, 30.0, 28.0]], "iscrowd": 0},
            {"id": 4, "image_id": 103, "category_id": 7, "segmentation": rle.encode_mask(a)},
            {"id": 5, "image_id": 104, "category_id": 7, "segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]]},
            {"id": 6, "image_id": 101, "category_id": 7, "segmentation": {"size": [30, 40], "counts": [0, 5]}},
            {"id": 7, "image_id": 101, "category_id": 99, "segmentation": rle.encode_mask(a)},
        ],
    }, a, b


def test_rle_and_polygon_annotations_are_imported_onto_matching_images(conn):
    coco, a, b = _foreign_coco()
    report = import_coco(conn, coco)
    assert report.annotations_imported == 3
    assert report.annotations_skipped_image == 2  # not_here.png and the resized c.png
    assert report.annotations_invalid == 2  # runs not covering the mask, unknown category
    assert report.images_unmatched == ["not_here.png"] and len(report.images_size_mismatch) == 1
    assert any("not_here.png" in w for w in report.warnings)
    ids = {r["file_name"]: r["id"] for r in storage.list_images(conn)}
    on_a = storage.list_annotations(conn, ids["a.png"])
    on_b = storage.list_annotations(conn, ids["sub/b.jpg"])
    assert len(on_a) == 2 and len(on_b) == 1
    np.testing.assert_array_equal(rle.decode_mask(on_a[0]["segmentation"]), a)
    assert on_a[0]["score"] == 0.8 and on_a[0]["level"] is None and on_a[0]["prompt"] is None
    np.testing.assert_array_equal(rle.decode_mask(on_b[0]["segmentation"]), b)
    polygon = mask_util.decode(mask_util.merge(mask_util.frPyObjects([[30.0, 20.0, 38.0, 20.0, 38.0, 28.0, 30.0, 28.0]], 30, 40)))
    np.testing.assert_array_equal(rle.decode_mask(on_a[1]["segmentation"]), polygon)


def test_categories_are_merged_by_name(conn):
    storage.create_category(conn, "dog", "#123456")
    coco, _, _ = _foreign_coco()
    report = import_coco(conn, coco)
    assert report.categories_created == ["cat"]
    cats = {c["name"]: c for c in storage.list_categories(conn)}
    assert set(cats) == {"dog", "cat"} and cats["dog"]["color"] == "#123456"


def test_importing_the_same_file_twice_adds_nothing(conn):
    coco, _, _ = _foreign_coco()
    import_coco(conn, coco)
    again = import_coco(conn, coco)
    assert again.annotations_imported == 0 and again.annotations_duplicate == 3
    assert conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 3


def test_a_trimask_export_imports_back_identically(tmp_path, conn):
    from trimask.coco_export import build_coco

    coco, _, _ = _foreign_coco()
    import_coco(conn, coco)
    exported = build_coco(conn)
    other = storage.connect(tmp_path / "other" / storage.DB_FILENAME)
    build_index(tmp_path / "images", other)
    report = import_coco(other, exported)
    assert report.annotations_imported == 3 and not report.images_unmatched
    key = lambda d: [(a["image_id"], a["segmentation"]["counts"], a["area"], a["bbox"]) for a in d["annotations"]]  # noqa: E731
    assert key(build_coco(other)) == key(exported)
    other.close()


@pytest.mark.parametrize(
    "content, message",
    [("{", "not valid JSON"), ("[]", "not a COCO file"), ('{"images": []}', "not a COCO file")],
)
def test_files_that_are_not_coco_are_refused(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(TrimaskError, match=message):
        load_coco_file(path)


def test_import_coco_command_reports_counts_and_warns_about_unknown_images(tmp_path, capsys):
    make_images(tmp_path / "images")
    coco, _, _ = _foreign_coco()
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(coco))
    args = ["import-coco", str(path), "--images", str(tmp_path / "images"), "--annotations", str(tmp_path / "ann")]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "imported 3 annotations onto 2 images" in captured.out
    assert "not_here.png" in captured.err and "warning" in captured.err
    assert cli_main(args) == 0
    assert "3 already present" in capsys.readouterr().out


def test_import_without_images_or_database_says_what_to_pass(tmp_path, capsys):
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(_foreign_coco()[0]))
    assert cli_main(["import-coco", str(path), "--annotations", str(tmp_path / "ann")]) == 1
    assert "--images" in capsys.readouterr().err
