"""The HTTP API of the design's contract, through Flask's test client with a fake embedder."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from service_helpers import FakeEmbedder, annotation_body, box_mask, make_app, make_images, write_image
from trimask.errors import TrimaskError
from trimask.service import rle


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


def _category(client, name="cat") -> int:
    return client.post("/api/categories", json={"name": name}).get_json()["id"]


def test_images_are_listed_recursively_with_size_and_counts(client):
    images = client.get("/api/images").get_json()
    assert [(i["file_name"], i["width"], i["height"], i["num_annotations"]) for i in images] == [
        ("a.png", 40, 30, 0), ("c.png", 8, 8, 0), ("sub/b.jpg", 24, 16, 0),
    ]
    assert [i["id"] for i in images] == [1, 2, 3]


def test_image_ids_survive_a_restart_with_new_files(tmp_path):
    first = {i["file_name"]: i["id"] for i in make_app(tmp_path).test_client().get("/api/images").get_json()}
    write_image(tmp_path / "images" / "0_new.png", 10, 10)
    second = {i["file_name"]: i["id"] for i in make_app(tmp_path).test_client().get("/api/images").get_json()}
    assert all(second[name] == first[name] for name in first)
    assert second["0_new.png"] == 4


def test_rescan_finds_files_added_while_serving(client, tmp_path):
    write_image(tmp_path / "images" / "d.png", 12, 10)
    assert len(client.get("/api/images").get_json()) == 3
    listed = {i["file_name"]: i["id"] for i in client.get("/api/images?rescan=1").get_json()}
    assert listed["d.png"] == 4 and len(listed) == 4


def test_empty_or_missing_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(TrimaskError, match="no images found"):
        make_app(tmp_path)
    with pytest.raises(TrimaskError, match="does not exist"):
        make_app(tmp_path, IMAGES_DIR=tmp_path / "missing")


def test_annotations_folder_inside_the_images_folder_is_not_scanned(tmp_path):
    images = make_images(tmp_path / "images")
    write_image(images / "annotations" / ".cache" / "display" / "x.png", 4, 4)
    write_image(images / "annotations" / "y.png", 4, 4)
    app = make_app(tmp_path, ANNOTATIONS_DIR=images / "annotations")
    names = [i["file_name"] for i in app.test_client().get("/api/images").get_json()]
    assert names == ["a.png", "c.png", "sub/b.jpg"]


def test_image_file_is_served_as_is(client, tmp_path):
    response = client.get("/api/images/3/file")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.data == (tmp_path / "images" / "sub" / "b.jpg").read_bytes()


def test_exif_rotated_image_is_served_upright_at_the_listed_size(tmp_path):
    images = tmp_path / "images"
    write_image(images / "rot.jpg", 30, 20, exif_orientation=6)  # stored 30x20, shown 20x30
    client = make_app(tmp_path).test_client()
    listed = {i["file_name"]: i for i in client.get("/api/images").get_json()}["rot.jpg"]
    assert (listed["width"], listed["height"]) == (20, 30)
    response = client.get(f"/api/images/{listed['id']}/file")
    assert response.mimetype == "image/png"
    import io

    assert Image.open(io.BytesIO(response.data)).size == (20, 30)


def test_embedding_is_fp16_bytes_with_shape_dtype_model_and_etag(app, client):
    response = client.get("/api/images/1/embedding")
    assert response.status_code == 200
    assert response.headers["X-Embedding-Shape"] == "1,256,64,64"
    assert response.headers["X-Embedding-Dtype"] == "float16"
    assert response.headers["X-Model-Id"] == FakeEmbedder.identity
    assert response.headers["ETag"].startswith('"') and "no-cache" in response.headers["Cache-Control"]
    got = np.frombuffer(response.data, dtype="<f2").reshape(1, 256, 64, 64)
    expected = FakeEmbedder().embed_path(app.extensions["trimask"].index.get(1).path).astype(np.float16)
    np.testing.assert_array_equal(got, expected)


def test_embedding_revalidation_answers_304_without_computing(tmp_path):
    embedder = FakeEmbedder()
    client = make_app(tmp_path, EMBEDDER=embedder).test_client()
    etag = client.get("/api/images/2/embedding").headers["ETag"]
    again = client.get("/api/images/2/embedding", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""
    assert len(embedder.calls) == 1
    other = client.get("/api/images/1/embedding")
    assert other.headers["ETag"] != etag


def test_concurrent_requests_for_one_image_compute_it_once(tmp_path):
    embedder = FakeEmbedder(delay=0.2)
    app = make_app(tmp_path, EMBEDDER=embedder)
    bodies: list[bytes] = []

    def fetch():
        bodies.append(app.test_client().get("/api/images/1/embedding").data)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(embedder.calls) == 1
    assert len(bodies) == 6 and len(set(bodies)) == 1


def test_requesting_an_image_precomputes_the_next_ones_in_the_background(tmp_path):
    embedder = FakeEmbedder()
    app = make_app(tmp_path, EMBEDDER=embedder, PRECOMPUTE=True)
    client = app.test_client()
    client.get("/api/images/1/embedding")
    assert app.extensions["trimask"].embeddings.wait_idle(timeout=20)
    assert sorted(p.name for p in embedder.calls) == ["a.png", "b.jpg", "c.png"]
    status = client.get("/api/status").get_json()
    assert status["embeddings_cached"] == 3 and status["embeddings_total"] == 3
    client.get("/api/images/2/embedding")
    assert len(embedder.calls) == 3  # served from memory, not recomputed


def test_status_reports_model_device_and_progress(client):
    status = client.get("/api/status").get_json()
    assert status["model"] == "tiny" and status["device"] == "cpu"
    assert (status["embeddings_cached"], status["embeddings_total"], status["images"]) == (0, 3, 3)
    client.get("/api/images/1/embedding")
    status = client.get("/api/status").get_json()
    assert status["embeddings_cached"] == 1 and status["model_id"] == FakeEmbedder.identity


def test_categories_are_created_once_per_name_with_colours(client):
    created = client.post("/api/categories", json={"name": "cat"})
    assert created.status_code == 201
    cat = created.get_json()
    assert cat["name"] == "cat" and cat["color"].startswith("#")
    again = client.post("/api/categories", json={"name": "cat", "color": "#000000"})
    assert again.status_code == 200 and again.get_json() == cat
    dog = client.post("/api/categories", json={"name": "dog", "color": "#ABCDEF"}).get_json()
    assert dog["color"] == "#abcdef"
    assert client.get("/api/categories").get_json() == [cat, dog]
    renamed = client.put(f"/api/categories/{dog['id']}", json={"name": "wolf"}).get_json()
    assert renamed["name"] == "wolf"
    assert client.put(f"/api/categories/{dog['id']}", json={"name": "cat"}).status_code == 409


def test_annotation_is_saved_as_rle_with_area_bbox_and_listed(client):
    cid = _category(client)
    mask = box_mask(30, 40, 5, 10, 3, 20)
    response = client.post("/api/images/1/annotations", json=annotation_body(mask, cid))
    assert response.status_code == 201
    ann = response.get_json()
    assert response.headers["Location"] == f"/api/annotations/{ann['id']}"
    assert response.headers["ETag"] == '"1"'
    assert ann["area"] == 85 and ann["bbox"] == [3.0, 5.0, 17.0, 5.0]
    assert ann["image_id"] == 1 and ann["category_id"] == cid and ann["version"] == 1
    assert ann["score"] == 0.91 and ann["level"] == "part" and ann["iscrowd"] == 0
    assert ann["prompt"] == {"points": [[3.5, 4.0]], "labels": [1], "box": None}
    np.testing.assert_array_equal(rle.decode_mask(ann["segmentation"]), mask)
    assert client.get("/api/images/1/annotations").get_json() == [ann]
    assert client.get("/api/images/2/annotations").get_json() == []
    assert client.get(f"/api/annotations/{ann['id']}").get_json() == ann
    assert client.get("/api/images").get_json()[0]["num_annotations"] == 1


def test_uncompressed_counts_are_accepted_and_stored_compressed(client):
    cid = _category(client)
    mask = box_mask(8, 8, 2, 5, 1, 4)
    runs = rle.decode_counts_string(rle.encode_mask(mask)["counts"], 64)
    body = annotation_body(mask, cid, segmentation={"size": [8, 8], "counts": runs})
    ann = client.post("/api/images/2/annotations", json=body).get_json()
    assert ann["segmentation"] == rle.encode_mask(mask)


def test_update_with_the_current_version_succeeds_and_a_stale_one_gets_409(client):
    cid = _category(client)
    other = _category(client, "dog")
    ann = client.post("/api/images/1/annotations", json=annotation_body(box_mask(30, 40, 0, 5, 0, 5), cid)).get_json()
    first = client.put(f"/api/annotations/{ann['id']}", json={"category_id": other, "version": 1})
    assert first.status_code == 200
    assert first.get_json()["category_id"] == other and first.get_json()["version"] == 2
    assert first.get_json()["segmentation"] == ann["segmentation"]  # untouched fields kept
    stale = client.put(f"/api/annotations/{ann['id']}", json={"level": "whole", "version": 1})
    assert stale.status_code == 409 and "version" in stale.get_json()["error"]
    via_header = client.put(f"/api/annotations/{ann['id']}", json={"level": "whole"}, headers={"If-Match": '"2"'})
    assert via_header.status_code == 200 and via_header.get_json()["version"] == 3
    missing = client.put(f"/api/annotations/{ann['id']}", json={"level": "subpart"})
    assert missing.status_code == 428
    assert client.get(f"/api/annotations/{ann['id']}").get_json()["level"] == "whole"


def test_a_full_annotation_as_returned_can_be_sent_back_as_the_update(client):
    cid = _category(client)
    ann = client.post("/api/images/1/annotations", json=annotation_body(box_mask(30, 40, 0, 5, 0, 5), cid)).get_json()
    ann["segmentation"] = rle.encode_mask(box_mask(30, 40, 10, 20, 10, 20))
    updated = client.put(f"/api/annotations/{ann['id']}", json=ann)
    assert updated.status_code == 200 and updated.get_json()["area"] == 100


def test_delete_removes_the_annotation_and_checks_a_given_version(client):
    cid = _category(client)
    ann = client.post("/api/images/1/annotations", json=annotation_body(box_mask(30, 40, 0, 5, 0, 5), cid)).get_json()
    assert client.delete(f"/api/annotations/{ann['id']}?version=7").status_code == 409
    assert client.delete(f"/api/annotations/{ann['id']}", headers={"If-Match": '"1"'}).get_json() == {
        "id": ann["id"], "deleted": True,
    }
    assert client.get(f"/api/annotations/{ann['id']}").status_code == 404
    assert client.delete(f"/api/annotations/{ann['id']}").status_code == 404


def test_every_response_carries_cross_origin_isolation_headers(client):
    for path in ("/api/images", "/api/nope", "/", "/ort/x.wasm", "/api/images/1/embedding"):
        response = client.get(path)
        assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin", path
        assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp", path


def test_missing_frontend_build_gives_503_with_the_build_command_while_the_api_works(client):
    page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 503 and b"npm" in page.data and page.mimetype == "text/html"
    as_json = client.get("/", headers={"Accept": "application/json"})
    assert as_json.status_code == 503 and "build" in as_json.get_json()["error"]
    assert client.get("/api/images").status_code == 200


def test_built_frontend_and_onnxruntime_files_are_served(tmp_path):
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>trimask</title>")
    (dist / "assets" / "main-abc.js").write_text("console.log(1)")
    ort = tmp_path / "ort"
    ort.mkdir()
    (ort / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm")
    (ort / "ort-wasm-simd-threaded.mjs").write_text("export {}")
    client = make_app(tmp_path, FRONTEND_DIST=dist, ORT_DIR=ort).test_client()
    assert b"trimask" in client.get("/").data
    asset = client.get("/assets/main-abc.js")
    assert asset.status_code == 200 and "immutable" in asset.headers["Cache-Control"]
    wasm = client.get("/ort/ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.mimetype == "application/wasm"
    assert client.get("/ort/ort-wasm-simd-threaded.mjs").mimetype == "text/javascript"
    assert client.get("/ort/nope.wasm").status_code == 404
    assert client.get("/missing.js").status_code == 404


def test_decoder_has_a_strong_etag_and_revalidates_with_304(client, tmp_path):
    response = client.get("/api/decoder.onnx")
    assert response.status_code == 200 and response.data == b"fake onnx bytes"
    etag = response.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert "no-cache" in response.headers["Cache-Control"]
    again = client.get("/api/decoder.onnx", headers={"If-None-Match": etag})
    assert again.status_code == 304
    (tmp_path / "decoder.onnx").write_bytes(b"a new export")
    changed = client.get("/api/decoder.onnx", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag


def test_quantized_decoder_is_asked_for_with_a_query_flag(tmp_path):
    asked: list[bool] = []
    fp32, quant = tmp_path / "d.onnx", tmp_path / "d.quant.onnx"
    fp32.write_bytes(b"fp32")
    quant.write_bytes(b"quant")

    def provide(quantized: bool):
        asked.append(quantized)
        return quant if quantized else fp32

    client = make_app(tmp_path, DECODER_FILE=provide).test_client()
    assert client.get("/api/decoder.onnx?quantized=1").data == b"quant"
    assert client.get("/api/decoder.onnx").data == b"fp32"
    assert asked == [True, False]


def test_export_returns_coco_and_writes_it_to_the_annotations_folder(client, tmp_path):
    cid = _category(client)
    client.post("/api/images/1/annotations", json=annotation_body(box_mask(30, 40, 0, 5, 0, 5), cid))
    response = client.get("/api/export/coco?download=1")
    coco = response.get_json()
    assert "attachment" in response.headers["Content-Disposition"]
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 1 and coco["categories"][0]["name"] == "cat"
    assert (tmp_path / "annotations" / "coco.json").read_bytes() == response.data


class TestToken:
    TOKEN = "s3cret-token"

    @pytest.fixture
    def client(self, tmp_path):
        return make_app(tmp_path, TOKEN=self.TOKEN).test_client()

    def test_api_without_the_token_is_refused(self, client):
        for path in ("/api/images", "/api/status", "/api/images/1/file", "/api/decoder.onnx"):
            response = client.get(path)
            assert response.status_code == 401 and "token" in response.get_json()["error"], path
        assert client.get("/api/images", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/api/categories", json={"name": "x"}).status_code == 401

    def test_bearer_header_and_query_token_are_accepted(self, client):
        assert client.get("/api/images", headers={"Authorization": f"Bearer {self.TOKEN}"}).status_code == 200
        assert client.get(f"/api/images?token={self.TOKEN}").status_code == 200

    def test_opening_the_page_with_the_token_lets_its_own_requests_through(self, client):
        client.get(f"/?token={self.TOKEN}")
        cookie = client.get_cookie("trimask_token")
        assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"
        assert client.get("/api/images/1/file").status_code == 200
