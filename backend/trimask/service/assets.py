"""Files the browser loads: the built frontend, onnxruntime-web's WASM, and decoder.onnx.

Every file is looked up with ``send_from_directory`` (which refuses paths that
leave the folder), so ``..`` and absolute paths in a URL never reach the disk.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from flask import Blueprint, Response, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import BadRequest, NotFound

from trimask.service.state import current

bp = Blueprint("assets", __name__)

BUILD_HINT = (
    "the frontend has not been built: run `bash scripts/setup.sh` (or `npm --prefix frontend ci && "
    "npm --prefix frontend run build`) and reload; the HTTP API under /api works meanwhile."
)

_digests: dict[Path, tuple[int, int, str]] = {}
_digests_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoized by (mtime, size): the decoder's strong ETag."""
    st = path.stat()
    with _digests_lock:
        hit = _digests.get(path)
    if hit and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    with _digests_lock:
        _digests[path] = (st.st_mtime_ns, st.st_size, digest.hexdigest())
    return digest.hexdigest()


def _frontend_missing() -> Response:
    if request.accept_mimetypes.accept_html:
        page = (
            "<!doctype html><meta charset=utf-8><title>trimask: frontend not built</title>"
            f"<h1>trimask: frontend not built</h1><p>{BUILD_HINT}</p>"
        )
        response = Response(page, status=503, mimetype="text/html")
    else:
        response = jsonify({"error": BUILD_HINT})
        response.status_code = 503
    return response


@bp.get("/")
def index() -> Response:
    dist = current().frontend_dist
    if not (dist / "index.html").is_file():
        return _frontend_missing()
    response = send_from_directory(dist, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/<path:filename>")
def frontend_file(filename: str) -> Response:
    if filename.startswith("api/"):
        raise NotFound()
    dist = current().frontend_dist
    if not dist.is_dir():
        return _frontend_missing()
    response = send_from_directory(dist, filename, max_age=0)
    # Vite's hashed assets never change; everything else is revalidated.
    if filename.startswith("assets/"):
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    return response


@bp.get("/ort/<path:filename>")
def ort_file(filename: str) -> Response:
    """onnxruntime-web's ``.wasm``/``.mjs`` files, served from our own origin (never a CDN)."""
    for folder in current().ort_dirs:
        if folder.is_dir():
            try:
                return send_from_directory(folder, filename, max_age=3600)
            except NotFound:
                continue
    raise NotFound()


@bp.get("/api/decoder.onnx")
def decoder_onnx() -> Response:
    """The model's prompt encoder + mask decoder as ONNX (``?quantized=1``: uint8 weights).

    ``?part=prepare|prepared|hover`` gives the optional fast path's graphs
    (image-side projections once per image, then the per-click rest, or the
    per-click rest for a hover preview's one mask).

    Exported on first use; a strong ETag (the file's SHA-256) lets the browser
    download it once and revalidate with a 304 afterwards.
    """
    state = current()
    quantized = request.args.get("quantized") in ("1", "true")
    part = request.args.get("part", "decoder")
    if part not in state.decoder_parts:
        raise BadRequest(f"part must be one of {', '.join(state.decoder_parts)}, not {part!r}.")
    path = Path(state.decoder_file(quantized, part))
    etag = file_sha256(path)
    response = send_file(
        path, mimetype="application/octet-stream", download_name=f"{part}.onnx", etag=etag, conditional=True, max_age=0
    )
    response.headers["Cache-Control"] = "no-cache"
    if state.embeddings.known_model_id:
        response.headers["X-Model-Id"] = state.embeddings.known_model_id
    return response
