"""``/api/images``: the folder's images, their pixels and their SAM embeddings."""
from __future__ import annotations

import threading
from pathlib import Path

from flask import Blueprint, Response, jsonify, request, send_file

from trimask.errors import TrimaskError
from trimask.service import storage
from trimask.service.embeddings import EMBEDDING_SHAPE
from trimask.service.image_index import ImageRecord
from trimask.service.state import ServiceUnavailable, current, db

bp = Blueprint("images", __name__, url_prefix="/api/images")

# Formats every browser shows as they are; others (TIFF) and EXIF-rotated files
# are re-encoded as PNG with the orientation applied, so the browser shows exactly
# the pixels (and the width x height) the model saw.
BROWSER_FORMATS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp"}
_display_lock = threading.Lock()


def image_json(record: ImageRecord, num_annotations: int) -> dict:
    return {
        "id": record.id,
        "file_name": record.file_name,
        "width": record.width,
        "height": record.height,
        "num_annotations": num_annotations,
    }


@bp.get("")
def list_images() -> Response:
    """``[{id, file_name, width, height, num_annotations}]`` in listing order; ``?rescan=1`` rescans the folder."""
    state = current()
    index = state.rescan() if request.args.get("rescan") in ("1", "true") else state.index
    counts = storage.annotation_counts(db())
    return jsonify([image_json(r, counts.get(r.id, 0)) for r in index.records])


@bp.get("/<int:image_id>")
def get_image(image_id: int) -> Response:
    record = current().index.get(image_id)
    count = db().execute("SELECT COUNT(*) FROM annotations WHERE image_id = ?", (image_id,)).fetchone()[0]
    return jsonify(image_json(record, count))


_reencode_memo: dict[Path, tuple[int, int, bool]] = {}


def _needs_reencoding(path: Path) -> bool:
    """True for formats browsers do not show and for files with an EXIF orientation.

    Memoized by (mtime, size): reading a PNG's EXIF can mean decoding the whole file.
    """
    if path.suffix.lower() not in BROWSER_FORMATS:
        return True
    st = path.stat()
    hit = _reencode_memo.get(path)
    if hit and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2]
    from PIL import Image

    try:
        with Image.open(path) as im:
            needed = int(im.getexif().get(0x0112, 1) or 1) != 1
    except Exception:
        needed = True  # load_image will report the problem by name
    _reencode_memo[path] = (st.st_mtime_ns, st.st_size, needed)
    return needed


def _display_png(record: ImageRecord) -> Path:
    """A PNG of the image as the model sees it (orientation applied), cached by content hash."""
    from PIL import Image

    from trimask.image_io import load_image

    state = current()
    digest = state.embeddings.hashes.get(record.path)
    out = state.cache_dir / "display" / f"{digest}.png"
    with _display_lock:
        if not out.is_file():
            pixels = load_image(record.path)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)
            tmp.replace(out)
    return out


@bp.get("/<int:image_id>/file")
def image_file(image_id: int) -> Response:
    """The image's bytes (re-encoded as PNG when a browser would not show the file as the model sees it)."""
    record = current().index.get(image_id)
    if not record.path.is_file():
        raise storage.NotFoundError(f"the file of image {image_id} ({record.file_name}) is gone from the folder.")
    path = _display_png(record) if _needs_reencoding(record.path) else record.path
    response = send_file(path, conditional=True, max_age=0, etag=True)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/<int:image_id>/embedding")
def image_embedding(image_id: int) -> Response:
    """Raw little-endian float16 bytes of the [1, 256, 64, 64] embedding, with shape/dtype/model headers.

    Computes it on first request; answers 304 to a matching ``If-None-Match``;
    queues the next images for background computation.
    """
    state = current()
    record = state.index.get(image_id)
    if not record.path.is_file():
        raise storage.NotFoundError(f"the file of image {image_id} ({record.file_name}) is gone from the folder.")
    headers = {
        "Cache-Control": "no-cache",
        "X-Embedding-Shape": ",".join(str(d) for d in EMBEDDING_SHAPE),
        "X-Embedding-Dtype": "float16",
        "Access-Control-Expose-Headers": "X-Embedding-Shape, X-Embedding-Dtype, X-Model-Id, ETag",
    }
    etag = state.embeddings.etag(record)
    if request.if_none_match.contains(etag.strip('"')):
        state.embeddings.prefetch_after(image_id)
        return Response(status=304, headers={**headers, "ETag": etag, "X-Model-Id": state.embeddings.model_id})
    try:
        blob = state.embeddings.get(record)
    except ServiceUnavailable:
        raise
    except TrimaskError as exc:
        raise ServiceUnavailable(f"the embedding of {record.file_name} cannot be computed: {exc}") from exc
    state.embeddings.prefetch_after(image_id)
    response = Response(blob.data, mimetype="application/octet-stream", headers=headers)
    response.headers["ETag"] = blob.etag
    response.headers["X-Model-Id"] = blob.model_id
    return response
