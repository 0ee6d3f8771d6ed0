"""``GET /api/status``: which model serves, on what device, and how far embedding has got."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from trimask.service.state import current, db

bp = Blueprint("status", __name__, url_prefix="/api")


@bp.get("/status")
def status() -> Response:
    """``{model, model_id, device, embeddings_cached, embeddings_total, embeddings_queued, images,
    annotations, categories, decoder_parts}``; ``model_id`` is null until the model's identity has been computed."""
    state = current()
    conn = db()
    return jsonify(
        {
            "model": state.model_type,
            "model_id": state.embeddings.known_model_id,
            "device": state.embeddings.device,
            "decoder_parts": list(state.decoder_parts),
            **state.embeddings.status(),
            "images": len(state.index),
            "annotations": conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0],
            "categories": conn.execute("SELECT COUNT(*) FROM categories").fetchone()[0],
        }
    )
