"""The Flask application factory of the annotation service.

``create_app(config)`` takes every setting as a key (nothing read from globals):

===================  ===========================================================
IMAGES_DIR           folder of images (scanned recursively), required
ANNOTATIONS_DIR      where the database, exports and caches live (default ./annotations)
MODEL_TYPE           vit_h | vit_l | vit_b | vit_t | tiny (default tiny)
CHECKPOINT           checkpoint file or None (tiny: the bundled weights)
DEVICE               auto | cpu | cuda (default auto)
TOKEN                required on every /api request when set (see security.py)
FRONTEND_DIST        the built frontend (default <repo>/frontend/dist; may be missing)
CACHE_DIR            embeddings and decoders (default <ANNOTATIONS_DIR>/.cache)
ORT_DIR              onnxruntime-web's dist folder (default frontend/node_modules/onnxruntime-web/dist)
EMBEDDER             an object with .identity and .embed_path(path), instead of loading the model
DECODER_FILE         a path, or a callable(quantized: bool) -> path, instead of exporting the decoder
PRECOMPUTE           compute the next images' embeddings in the background (default True)
MAX_CONTENT_LENGTH   largest accepted request body in bytes (default 16 MiB)
===================  ===========================================================
"""
from __future__ import annotations

import logging
import mimetypes
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

import trimask
from trimask.errors import TrimaskError
from trimask.service import security, storage
from trimask.service.embeddings import EmbeddingService
from trimask.service.image_index import build_index
from trimask.service.state import (
    PreconditionRequired,
    ServiceState,
    ServiceUnavailable,
    close_db,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(trimask.__file__).resolve().parents[2]
DEFAULT_FRONTEND_DIST = REPO_ROOT / "frontend" / "dist"
DEFAULT_ORT_DIR = REPO_ROOT / "frontend" / "node_modules" / "onnxruntime-web" / "dist"

DEFAULTS: dict[str, Any] = {
    "IMAGES_DIR": None,
    "ANNOTATIONS_DIR": "annotations",
    "MODEL_TYPE": "tiny",
    "CHECKPOINT": None,
    "DEVICE": "auto",
    "TOKEN": None,
    "FRONTEND_DIST": None,
    "CACHE_DIR": None,
    "ORT_DIR": None,
    "EMBEDDER": None,
    "DECODER_FILE": None,
    "PRECOMPUTE": True,
    "MAX_CONTENT_LENGTH": security.MAX_CONTENT_LENGTH,
}

# Browsers refuse to run module workers / wasm served with the wrong type.
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/wasm", ".wasm")

STATUS_FOR: list[tuple[type[BaseException], int]] = [
    (storage.NotFoundError, 404),
    (storage.ConflictError, 409),
    (PreconditionRequired, 428),
    (ServiceUnavailable, 503),
    (TrimaskError, 400),
]


def _embedder_factory(cfg: dict[str, Any], cache: Any):
    if cfg["EMBEDDER"] is not None:
        return lambda: cfg["EMBEDDER"]

    def make():
        from trimask.embedder import Embedder

        try:
            return Embedder(cfg["MODEL_TYPE"], cfg["CHECKPOINT"], device=cfg["DEVICE"], cache=cache)
        except TrimaskError as exc:
            raise ServiceUnavailable(f"the model {cfg['MODEL_TYPE']} cannot be loaded: {exc}") from exc

    return make


def _model_id_factory(cfg: dict[str, Any]):
    if cfg["EMBEDDER"] is not None:
        return None  # the injected embedder knows its identity

    def identity() -> str:
        from trimask.models.build import model_identity

        try:
            return model_identity(cfg["MODEL_TYPE"], cfg["CHECKPOINT"])
        except TrimaskError as exc:
            raise ServiceUnavailable(f"the model {cfg['MODEL_TYPE']} cannot be loaded: {exc}") from exc

    return identity


DECODER_PARTS = ("decoder", "prepare", "prepared", "hover")


def _decoder_provider(cfg: dict[str, Any], cache_dir: Path) -> tuple[Callable[[bool, str], Path], tuple[str, ...]]:
    """The function giving a decoder graph's path for (quantized, part), and the parts it offers.

    An injected DECODER_FILE offers only the complete decoder; the exporter
    also offers the optional fast path (prepare once per image, prepared per click, hover per preview).
    """
    given = cfg["DECODER_FILE"]
    if given is not None:
        provide_given = given if callable(given) else (lambda quantized: Path(given))
        return (lambda quantized, part="decoder": Path(provide_given(quantized))), ("decoder",)
    lock = threading.Lock()

    def provide(quantized: bool, part: str = "decoder") -> Path:
        from trimask.export.decoder_cache import decoder_file

        with lock:  # the exporter is safe across processes; this just avoids exporting twice here
            try:
                return Path(
                    decoder_file(
                        cfg["MODEL_TYPE"], cfg["CHECKPOINT"], cache_dir / "decoders", quantize=quantized, part=part
                    )
                )
            except TrimaskError as exc:
                raise ServiceUnavailable(f"the decoder cannot be exported: {exc}") from exc

    return provide, DECODER_PARTS


def _device_name(cfg: dict[str, Any]) -> str:
    embedder = cfg["EMBEDDER"]
    if embedder is not None:
        return str(getattr(embedder, "device", "cpu"))
    try:
        from trimask.embedder import resolve_device

        return str(resolve_device(cfg["DEVICE"]))
    except Exception:
        return str(cfg["DEVICE"])


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the annotation service for one images folder and one annotations folder.

    Raises:
        TrimaskError: the images folder is missing or holds no images, or the
            database cannot be opened.
    """
    cfg = {**DEFAULTS, **(config or {})}
    if not cfg["IMAGES_DIR"]:
        raise TrimaskError("no images folder given; pass --images DIR.")
    images_dir = Path(cfg["IMAGES_DIR"]).resolve()
    annotations_dir = Path(cfg["ANNOTATIONS_DIR"]).resolve()
    cache_dir = Path(cfg["CACHE_DIR"]).resolve() if cfg["CACHE_DIR"] else annotations_dir / ".cache"
    db_file = storage.db_path(annotations_dir)

    conn = storage.connect(db_file)
    try:
        index = build_index(images_dir, conn, exclude=[annotations_dir])
    finally:
        conn.close()
    if len(index) == 0:
        from trimask.image_io import IMAGE_EXTENSIONS

        raise TrimaskError(
            f"no images found in {images_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "pass --images DIR with your images, or run `trimask samples --out samples` for sample images."
        )

    cache = None
    if cfg["EMBEDDER"] is None:
        from trimask.embedding_cache import EmbeddingCache

        cache = EmbeddingCache(cache_dir / "embeddings")
    embeddings = EmbeddingService(
        index,
        _embedder_factory(cfg, cache),
        model_id=_model_id_factory(cfg),
        device=lambda: _device_name(cfg),
        cache=cache,
        precompute=bool(cfg["PRECOMPUTE"]),
    )
    frontend_dist = Path(cfg["FRONTEND_DIST"]) if cfg["FRONTEND_DIST"] else DEFAULT_FRONTEND_DIST
    ort_dirs = [Path(cfg["ORT_DIR"])] if cfg["ORT_DIR"] else [DEFAULT_ORT_DIR]
    ort_dirs.append(frontend_dist / "ort")
    decoder_file, decoder_parts = _decoder_provider(cfg, cache_dir)
    state = ServiceState(
        images_dir=images_dir,
        annotations_dir=annotations_dir,
        cache_dir=cache_dir,
        db_path=db_file,
        index=index,
        embeddings=embeddings,
        decoder_file=decoder_file,
        decoder_parts=decoder_parts,
        model_type=str(cfg["MODEL_TYPE"]),
        frontend_dist=frontend_dist,
        ort_dirs=ort_dirs,
        token=cfg["TOKEN"] or None,
    )

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(cfg["MAX_CONTENT_LENGTH"])
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # keep COCO's field order readable
    app.extensions["trimask"] = state
    app.teardown_appcontext(close_db)
    _register_hooks(app, state)
    _register_error_handlers(app)

    from trimask.service import annotations, assets, categories, export, images, status

    for module in (images, annotations, categories, export, status, assets):
        app.register_blueprint(module.bp)
    return app


def _register_hooks(app: Flask, state: ServiceState) -> None:
    @app.before_request
    def require_token() -> Response | None:
        if not state.token or not request.path.startswith("/api/"):
            return None
        if security.token_matches(
            state.token,
            security.bearer_token(request.headers.get("Authorization")),
            request.args.get("token"),
            request.cookies.get(security.TOKEN_COOKIE),
        ):
            return None
        return error_response(
            401,
            "this server needs its access token: open the URL that `trimask serve` printed "
            "(it ends in ?token=...) or send the header Authorization: Bearer TOKEN.",
        )

    @app.after_request
    def isolation_headers(response: Response) -> Response:
        # Cross-origin isolation lets the browser use SharedArrayBuffer, i.e. multi-threaded WASM.
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
        offered = request.args.get("token")
        if state.token and offered and security.token_matches(state.token, offered):
            # The page was opened with ?token=: let its own requests (fetch, <img>) carry it as a cookie.
            response.set_cookie(security.TOKEN_COOKIE, offered, httponly=True, samesite="Strict", path="/")
        return response


def error_response(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(TrimaskError)
    def on_trimask_error(exc: TrimaskError) -> Response:
        for kind, status in STATUS_FOR:
            if isinstance(exc, kind):
                return error_response(status, str(exc))
        return error_response(400, str(exc))

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        messages = {
            404: f"there is nothing at {request.path}.",
            405: f"{request.method} is not allowed on {request.path}.",
            413: f"the request body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes.",
        }
        response = error_response(exc.code or 500, messages.get(exc.code or 0, exc.description or exc.name))
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details.")
