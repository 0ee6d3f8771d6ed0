"""Every malformed request gets a 4xx with {"error": ...}, changes nothing saved, and the service stays up."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from service_helpers import annotation_body, box_mask, make_app
from trimask.errors import TrimaskError
from trimask.service import storage

GOOD_MASK = box_mask(30, 40, 5, 10, 3, 20)


@pytest.fixture
def setup(tmp_path):
    """An app with one category (id 1) and one annotation (id 1, version 1) on image 1."""
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html>")
    (tmp_path / "secret.txt").write_text("top secret")
    app = make_app(tmp_path, FRONTEND_DIST=dist, ORT_DIR=dist, MAX_CONTENT_LENGTH=64 * 1024)
    client = app.test_client()
    assert client.post("/api/categories", json={"name": "cat"}).status_code == 201
    assert client.post("/api/images/1/annotations", json=annotation_body(GOOD_MASK, 1)).status_code == 201
    return app, client, tmp_path


def _snapshot(tmp_path) -> str:
    conn = sqlite3.connect(tmp_path / "annotations" / storage.DB_FILENAME)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def _assert_refused(response, status: int | tuple[int, ...] = 400) -> str:
    allowed = status if isinstance(status, tuple) else (status,)
    assert response.status_code in allowed, (response.status_code, response.data[:200])
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def _body(**changes):
    body = annotation_body(GOOD_MASK, 1)
    body.update(changes)
    return body


BAD_ANNOTATION_BODIES = {
    "not an object": [1, 2, 3],
    "string": "hello",
    "null": None,
    "category id as string": _body(category_id="1"),
    "category id as bool": _body(category_id=True),
    "unknown category": _body(category_id=99),
    "missing category": {k: v for k, v in _body().items() if k != "category_id"},
    "missing segmentation": {k: v for k, v in _body().items() if k != "segmentation"},
    "segmentation as list": _body(segmentation=[1, 2]),
    "rle of the wrong size": _body(segmentation={"size": [40, 30], "counts": [0, 1200]}),
    "rle runs too short": _body(segmentation={"size": [30, 40], "counts": [0, 100]}),
    "rle runs too long": _body(segmentation={"size": [30, 40], "counts": [0, 1201]}),
    "rle negative run": _body(segmentation={"size": [30, 40], "counts": [-1, 1201]}),
    "rle float runs": _body(segmentation={"size": [30, 40], "counts": [0.5, 1199.5]}),
    "rle bad characters": _body(segmentation={"size": [30, 40], "counts": "\u00ff\u00fe"}),
    "rle overflowing string": _body(segmentation={"size": [30, 40], "counts": "oooooo?" * 40}),
    "rle truncated string": _body(segmentation={"size": [30, 40], "counts": "o"}),
    "empty mask": _body(segmentation={"size": [30, 40], "counts": [1200]}),
    "score as string": _body(score="high"),
    "level unknown": _body(level="huge"),
    "prompt as list": _body(prompt=[1, 2]),
    "prompt point not a pair": _body(prompt={"points": [[1, 2, 3]], "labels": [1], "box": None}),
    "prompt labels mismatch": _body(prompt={"points": [[1, 2]], "labels": [1, 0], "box": None}),
    "prompt label 7": _body(prompt={"points": [[1, 2]], "labels": [7], "box": None}),
    "prompt box of 3": _body(prompt={"points": [], "labels": [], "box": [1, 2, 3]}),
    "prompt unknown key": _body(prompt={"points": [], "labels": [], "box": None, "x": 1}),
    "prompt too many points": _body(prompt={"points": [[1, 1]] * 1001, "labels": [1] * 1001, "box": None}),
    "unknown field": _body(colour="red"),
    "image id of another image": _body(image_id=2),
    "deep but small nesting": _body(prompt={"points": [], "labels": [], "box": None}, level=None)
    | {"score": None, "segmentation": {"size": [30, 40], "counts": [0, 1200]}}
    | {"category_id": json.loads("[" * 40 + "]" * 40)},
}


@pytest.mark.parametrize("name", list(BAD_ANNOTATION_BODIES))
def test_bad_annotation_bodies_are_refused_and_change_nothing(setup, name):
    app, client, tmp_path = setup
    before = _snapshot(tmp_path)
    _assert_refused(client.post("/api/images/1/annotations", json=BAD_ANNOTATION_BODIES[name]))
    if not name.startswith("missing"):  # a PUT may leave fields out: they keep their values
        body = BAD_ANNOTATION_BODIES[name]
        _assert_refused(client.put("/api/annotations/1", json={**body, "version": 1} if isinstance(body, dict) else body))
    assert _snapshot(tmp_path) == before
    assert client.get("/api/status").status_code == 200


@pytest.mark.parametrize(
    "raw, content_type",
    [
        (b"{", "application/json"),
        (b"", "application/json"),
        (b'{"category_id": 1,}', "application/json"),
        (b'{"score": NaN}', "application/json"),
        (b'{"score": Infinity}', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"[" * 30_000 + b"]" * 30_000, "application/json"),  # would exhaust the recursion limit
        (b"category_id=1", "application/x-www-form-urlencoded"),
    ],
)
def test_unparseable_bodies_are_refused(setup, raw, content_type):
    _, client, tmp_path = setup
    before = _snapshot(tmp_path)
    for method, path in (("POST", "/api/images/1/annotations"), ("PUT", "/api/annotations/1"), ("POST", "/api/categories")):
        _assert_refused(client.open(path, method=method, data=raw, content_type=content_type))
    assert _snapshot(tmp_path) == before


def test_body_over_the_size_limit_gets_413(setup):
    _, client, tmp_path = setup
    before = _snapshot(tmp_path)
    huge = json.dumps(_body(prompt={"points": [[1.123456, 2.123456]] * 5000, "labels": [1] * 5000, "box": None}))
    error = _assert_refused(client.post("/api/images/1/annotations", data=huge, content_type="application/json"), 413)
    assert "larger than the limit" in error
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/api/images/99/file", 404),
        ("GET", "/api/images/99/embedding", 404),
        ("GET", "/api/images/99/annotations", 404),
        ("POST", "/api/images/99/annotations", 404),
        ("GET", "/api/images/abc/file", 404),
        ("GET", "/api/images/-1/file", 404),
        ("GET", "/api/images/99999999999999999999999999/file", 404),
        ("GET", "/api/annotations/99", 404),
        ("PUT", "/api/annotations/99", 404),
        ("DELETE", "/api/annotations/99", 404),
        ("DELETE", "/api/annotations/99999999999999999999999", 404),
        ("GET", "/api/categories/99", 404),
        ("DELETE", "/api/categories/99", 404),
        ("GET", "/api/nothing-here", 404),
        ("DELETE", "/api/images", 405),
        ("PUT", "/api/categories", 405),
        ("POST", "/api/export/coco", 405),
    ],
)
def test_unknown_ids_and_routes_get_json_errors(setup, method, path, status):
    _, client, tmp_path = setup
    before = _snapshot(tmp_path)
    body = json.dumps(_body(version=1)) if method in ("POST", "PUT") else None
    _assert_refused(client.open(path, method=method, data=body, content_type="application/json"), status)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e/secret.txt",
        "/assets/../../secret.txt",
        "/ort/../secret.txt",
        "/ort/..%2fsecret.txt",
        "/ort/%2e%2e%2fsecret.txt",
        "/ort//etc/passwd",
        "/%2fetc%2fpasswd",
        "/api/images/1/file/../../../secret.txt",
        "/api/images/..%2f..%2fsecret.txt/file",
    ],
)
def test_path_traversal_never_reaches_the_file_system(setup, path):
    _, client, _ = setup
    response = client.get(path)
    assert b"top secret" not in response.data and b"root:" not in response.data
    assert response.status_code in (400, 404), (path, response.status_code)


@pytest.mark.parametrize(
    "body, status",
    [
        ({"name": ""}, 400),
        ({"name": "   "}, 400),
        ({"name": 5}, 400),
        ({"name": "x" * 201}, 400),
        ({"name": "ok", "color": "red"}, 400),
        ({"name": "ok", "color": "#12345"}, 400),
        ({"name": "ok", "supercategory": 3}, 400),
        ({"name": "ok", "extra": 1}, 400),
        ([], 400),
    ],
)
def test_bad_categories_are_refused(setup, body, status):
    _, client, tmp_path = setup
    before = _snapshot(tmp_path)
    _assert_refused(client.post("/api/categories", json=body), status)
    _assert_refused(client.put("/api/categories/1", json=body), status)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("if_match", ['"abc"', '"-1"', '"0"', '"99999999999999999999999"', "*"])
def test_bad_versions_are_refused(setup, if_match):
    _, client, tmp_path = setup
    before = _snapshot(tmp_path)
    _assert_refused(client.put("/api/annotations/1", json={"level": "whole"}, headers={"If-Match": if_match}))
    _assert_refused(client.put("/api/annotations/1", json={"level": "whole", "version": "1"}))
    _assert_refused(client.delete("/api/annotations/1?version=x"))
    assert _snapshot(tmp_path) == before


def test_deleting_a_category_in_use_is_a_conflict(setup):
    _, client, tmp_path = setup
    before = _snapshot(tmp_path)
    assert "still labels" in _assert_refused(client.delete("/api/categories/1"), 409)
    assert _snapshot(tmp_path) == before


def test_an_unexpected_server_error_is_a_json_500_and_the_service_stays_up(tmp_path):
    class BrokenEmbedder:
        identity = "broken-0"
        device = "cpu"

        def embed_path(self, path):
            raise RuntimeError("boom")

    client = make_app(tmp_path, EMBEDDER=BrokenEmbedder()).test_client()
    assert "internal error" in _assert_refused(client.get("/api/images/1/embedding"), 500)
    assert client.get("/api/images").status_code == 200


def test_an_unreadable_image_gives_a_503_naming_the_file(tmp_path):
    class RefusingEmbedder:
        identity = "refusing-0"
        device = "cpu"

        def embed_path(self, path):
            raise TrimaskError(f"Could not decode the image file {path}.")

    client = make_app(tmp_path, EMBEDDER=RefusingEmbedder()).test_client()
    assert "a.png" in _assert_refused(client.get("/api/images/1/embedding"), 503)


def test_a_file_deleted_while_serving_is_a_404(setup):
    _, client, tmp_path = setup
    (tmp_path / "images" / "c.png").unlink()
    assert "gone" in _assert_refused(client.get("/api/images/2/file"), 404)
    assert "gone" in _assert_refused(client.get("/api/images/2/embedding"), 404)
    assert np.frombuffer(client.get("/api/images/1/embedding").data, dtype="<f2").size == 256 * 64 * 64
