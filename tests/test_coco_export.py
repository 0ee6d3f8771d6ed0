"""The COCO export loads in pycocotools, decodes to exactly the saved masks, and works as COCOeval results."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from service_helpers import annotation_body, make_app
from trimask.cli import main as cli_main
from trimask.coco_export import write_atomic
from trimask.errors import TrimaskError


def _random_blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    mask[int(rng.integers(h)), int(rng.integers(w))] = 1  # never empty
    return mask


@pytest.fixture
def saved(tmp_path):
    """An app with two categories and a dozen random masks across the three images."""
    app = make_app(tmp_path)
    client = app.test_client()
    cats = [client.post("/api/categories", json={"name": n}).get_json()["id"] for n in ("cat", "dog")]
    rng = np.random.default_rng(0)
    masks: dict[int, np.ndarray] = {}
    images = client.get("/api/images").get_json()
    for i in range(12):
        image = images[i % 3]
        mask = _random_blob(rng, image["height"], image["width"])
        body = annotation_body(mask, cats[i % 2], score=float(rng.uniform(0.5, 1.0)), level="whole")
        ann = client.post(f"/api/images/{image['id']}/annotations", json=body).get_json()
        masks[ann["id"]] = mask
    return tmp_path, client, masks


def _load_quietly(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_export_loads_in_pycocotools_and_decodes_to_the_saved_masks(saved):
    tmp_path, client, masks = saved
    client.get("/api/export/coco")
    coco = _load_quietly(tmp_path / "annotations" / "coco.json")
    assert len(coco.getImgIds()) == 3 and len(coco.getCatIds()) == 2
    assert sorted(coco.getAnnIds()) == sorted(masks)
    for ann in coco.loadAnns(coco.getAnnIds()):
        decoded = coco.annToMask(ann)
        np.testing.assert_array_equal(decoded, masks[ann["id"]])
        assert ann["area"] == int(masks[ann["id"]].sum())
        rle = ann["segmentation"]
        assert isinstance(rle["counts"], str)
        assert ann["bbox"] == [float(v) for v in mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})]
        assert ann["iscrowd"] == 0 and 0.5 <= ann["score"] <= 1.0
        image = coco.loadImgs(ann["image_id"])[0]
        assert rle["size"] == [image["height"], image["width"]]


def test_export_works_as_cocoeval_results_and_scores_perfectly_against_itself(saved):
    tmp_path, client, _ = saved
    data = client.get("/api/export/coco").get_json()
    gt = _load_quietly(tmp_path / "annotations" / "coco.json")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(data["annotations"])
        evaluator = COCOeval(gt, dt, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # every detection equals its ground truth: AP at IoU .50 is 1 wherever objects exist
    assert evaluator.stats[1] == pytest.approx(1.0)


def test_the_direct_serializer_equals_the_generic_json_encoder(saved):
    from trimask.coco_export import coco_bytes
    from trimask.service import rle, storage

    tmp_path, client, _ = saved
    rng = np.random.default_rng(5)
    while True:  # a mask whose compact counts hold a backslash, the one character JSON must escape
        mask = (rng.random((30, 40)) > 0.5).astype(np.uint8)
        if "\\" in rle.encode_mask(mask)["counts"]:
            break
    assert client.post("/api/images/1/annotations", json=annotation_body(mask, 1, score=None, level=None)).status_code == 201
    conn = storage.connect(tmp_path / "annotations" / storage.DB_FILENAME)
    expected = []
    for row in conn.execute("SELECT * FROM annotations ORDER BY id"):
        ann = storage.coco_annotation(row)
        ann["score"] = 1.0 if ann["score"] is None else ann["score"]
        expected.append(ann)
    summary, data = coco_bytes(conn)
    conn.close()
    parsed = json.loads(data)
    assert parsed["annotations"] == expected and summary.annotations == len(expected) == 13
    assert json.dumps(parsed["annotations"], separators=(",", ":")).encode() in data


def test_export_file_names_are_relative_to_the_images_folder(saved):
    _, client, _ = saved
    names = [i["file_name"] for i in client.get("/api/export/coco").get_json()["images"]]
    assert names == ["a.png", "c.png", "sub/b.jpg"]


def test_imported_annotations_without_a_score_export_with_score_1(tmp_path):
    from trimask.service import storage

    app = make_app(tmp_path)
    client = app.test_client()
    client.post("/api/categories", json={"name": "cat"})
    mask = np.zeros((30, 40), np.uint8)
    mask[1:4, 1:4] = 1
    client.post("/api/images/1/annotations", json=annotation_body(mask, 1, score=None))
    conn = storage.connect(tmp_path / "annotations" / storage.DB_FILENAME)
    assert storage.get_annotation(conn, 1)["score"] is None
    conn.close()
    assert client.get("/api/export/coco").get_json()["annotations"][0]["score"] == 1.0


def test_export_coco_command_writes_the_same_file(saved, capsys):
    tmp_path, client, masks = saved
    out = tmp_path / "out" / "dataset.json"
    assert cli_main(["export-coco", "--annotations", str(tmp_path / "annotations"), "--out", str(out)]) == 0
    assert f"{len(masks)} annotations" in capsys.readouterr().out
    from_cli = json.loads(out.read_text())
    from_api = client.get("/api/export/coco").get_json()
    from_cli["info"].pop("date_created")
    from_api["info"].pop("date_created")
    assert from_cli == from_api


def test_export_coco_command_without_a_database_says_what_to_pass(tmp_path, capsys):
    assert cli_main(["export-coco", "--annotations", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "--annotations" in err and len(err.strip().splitlines()) == 1


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "coco.json"
    target.write_text("old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", failing_fsync)
    with pytest.raises(TrimaskError, match="No space left"):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary left behind
