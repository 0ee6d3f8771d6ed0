"""The service on the real path: build_sam("tiny") weights, the real Embedder, cache and ONNX export."""
from __future__ import annotations

import numpy as np
import pytest

from service_helpers import make_app, tiny_checkpoint  # noqa: F401


@pytest.fixture
def real_app(tmp_path, tiny_checkpoint):  # noqa: F811
    import torch

    torch.set_num_threads(2)
    return make_app(
        tmp_path, EMBEDDER=None, DECODER_FILE=None, MODEL_TYPE="tiny", CHECKPOINT=tiny_checkpoint, DEVICE="cpu",
        CACHE_DIR=tmp_path / "cache",
    )


def test_embedding_is_the_encoder_output_and_is_cached_on_disk(real_app, tmp_path, tiny_checkpoint, monkeypatch):  # noqa: F811
    from trimask.embedder import Embedder
    from trimask.image_io import content_hash, load_image
    from trimask.models.build import model_identity

    client = real_app.test_client()
    response = client.get("/api/images/1/embedding")
    assert response.status_code == 200
    model_id = model_identity("tiny", tiny_checkpoint)
    assert response.headers["X-Model-Id"] == model_id
    served = np.frombuffer(response.data, dtype="<f2").reshape(1, 256, 64, 64).astype(np.float32)
    path = tmp_path / "images" / "a.png"
    reference = Embedder("tiny", tiny_checkpoint, device="cpu").embed_image(load_image(path))
    np.testing.assert_allclose(served, reference, rtol=2e-3, atol=2e-3)  # fp16 rounding only
    assert (tmp_path / "cache" / "embeddings" / model_id / f"{content_hash(path)}.npy").is_file()

    # A restarted server serves the cached embedding without loading the model.
    import trimask.embedder

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a cached embedding")

    monkeypatch.setattr(trimask.embedder, "Embedder", no_model)
    restarted = make_app(
        tmp_path, EMBEDDER=None, DECODER_FILE=None, MODEL_TYPE="tiny", CHECKPOINT=tiny_checkpoint,
        CACHE_DIR=tmp_path / "cache",
    )
    restarted.extensions["trimask"].embeddings.survey_cache()  # what `serve` runs in the background at start
    assert restarted.test_client().get("/api/status").get_json()["embeddings_cached"] == 1
    restarted = restarted.test_client()
    again = restarted.get("/api/images/1/embedding")
    assert again.data == response.data and again.headers["ETag"] == response.headers["ETag"]
    status = restarted.get("/api/status").get_json()
    assert status["device"] == "cpu" and status["embeddings_cached"] == 1


def test_served_decoder_runs_on_the_served_embedding(real_app):
    import onnxruntime as ort

    client = real_app.test_client()
    decoder = client.get("/api/decoder.onnx")
    assert decoder.status_code == 200 and decoder.headers["ETag"]
    assert client.get("/api/decoder.onnx", headers={"If-None-Match": decoder.headers["ETag"]}).status_code == 304
    embedding = np.frombuffer(client.get("/api/images/1/embedding").data, dtype="<f2").reshape(1, 256, 64, 64)
    session = ort.InferenceSession(decoder.data, providers=["CPUExecutionProvider"])
    outputs = session.run(
        ["iou_predictions", "low_res_masks"],
        {
            "image_embeddings": embedding.astype(np.float32),
            "point_coords": np.array([[[500.0, 400.0], [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[1.0, -1.0]], np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([30.0, 40.0], np.float32),
        },
    )
    assert outputs[0].shape == (1, 4) and outputs[1].shape == (1, 4, 256, 256)


def test_fast_path_graphs_are_served_and_listed_in_status(real_app):
    import onnxruntime as ort

    client = real_app.test_client()
    assert client.get("/api/status").get_json()["decoder_parts"] == ["decoder", "prepare", "prepared", "hover"]
    names = {}
    for part in ("prepare", "prepared", "hover"):
        response = client.get(f"/api/decoder.onnx?part={part}")
        assert response.status_code == 200 and response.headers["ETag"]
        session = ort.InferenceSession(response.data, providers=["CPUExecutionProvider"])
        names[part] = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
    prepare_outputs = names["prepare"][1]
    # What the once-per-image graph makes is what the per-click graph takes.
    assert prepare_outputs and prepare_outputs <= names["prepared"][0]
    # Refinement clicks take the fast path too: the per-click graph reads the previous mask.
    assert {"mask_input", "has_mask_input"} <= names["prepared"][0]
    # The hover graph takes what the per-click graph takes and answers with the best candidate's mask.
    assert names["hover"][0] == names["prepared"][0]
    assert {"best_token", "display_mask"} <= names["hover"][1]
    bad = client.get("/api/decoder.onnx?part=../../etc/passwd")
    assert bad.status_code == 400 and "part must be one of" in bad.get_json()["error"]


def test_injected_decoder_offers_no_fast_path(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    assert client.get("/api/status").get_json()["decoder_parts"] == ["decoder"]
    assert client.get("/api/decoder.onnx?part=prepare").status_code == 400
