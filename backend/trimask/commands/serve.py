"""``trimask serve``: the annotator's HTTP service on a threaded server."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from trimask.errors import TrimaskError

MODEL_CHOICES = ("tiny", "vit_h", "vit_l", "vit_b", "vit_t")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="annotate a folder of images in the browser",
        description="Serve the annotator for a folder of images. The browser gets each image's SAM "
        "embedding from this server and decodes clicks itself; every accepted mask is saved at once "
        "as COCO RLE in the annotations folder's SQLite database.",
    )
    parser.add_argument("--images", default="samples", metavar="DIR",
                        help="folder of images, scanned recursively (default: ./samples)")
    parser.add_argument("--model", default="tiny", choices=MODEL_CHOICES,
                        help="SAM model (default: tiny, the embedded default model)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="official checkpoint file for --model (not needed for tiny)")
    parser.add_argument("--annotations", default="annotations", metavar="DIR",
                        help="folder for the database, exports and caches (default: ./annotations)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1; any other needs --token)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the image encoder runs (default: auto, CUDA when present)")
    parser.add_argument("--token", default=None,
                        help="access token every API request must carry (default: $TRIMASK_TOKEN); "
                        "required when --host is not a loopback address")
    parser.add_argument("--no-precompute", action="store_true",
                        help="load the model and compute embeddings only when first asked for "
                        "(no work ahead of the annotator; a faster start)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.set_defaults(func=run)


def _bind(host: str, port: int):
    """Bind the threaded server before any slow work, so a taken port fails at once, in one line.

    The socket is bound here (werkzeug would print several lines and exit on its own).
    """
    import socket

    from werkzeug.serving import get_sockaddr, make_server, select_address_family

    def not_ready(environ, start_response):  # replaced by the app before serving starts
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"starting"]

    family = select_address_family(host, port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TrimaskError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
        sock.bind(get_sockaddr(host, port, family))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TrimaskError(
                f"port {port} on {host} is already in use (another trimask serve?); pass --port N for another port."
            ) from None
        raise TrimaskError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    try:
        return make_server(host, port, not_ready, threaded=True, fd=sock.fileno())
    finally:
        sock.close()  # the server holds its own duplicate of the descriptor


def _warm_up(app) -> None:
    """In the background: the model identity, the first image's embedding and the decoder export."""
    state = app.extensions["trimask"]
    log = logging.getLogger("trimask.serve")
    try:
        _ = state.embeddings.model_id
        if state.index.records:
            state.embeddings.enqueue(state.index.records[0].id)
        state.decoder_file(False)
    except TrimaskError as exc:
        log.warning("warning: %s", exc)
    threading.Thread(target=state.embeddings.survey_cache, name="trimask-survey", daemon=True).start()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from trimask.service.app import create_app
    from trimask.service.security import TOKEN_ENV, require_token_for_host

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    require_token_for_host(args.host, token)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise TrimaskError(f"checkpoint file not found: {args.checkpoint}; pass the path of the official .pth file.")
    if args.model != "tiny" and args.checkpoint is None:
        logging.getLogger("trimask.serve").warning(
            "warning: no --checkpoint for %s: using random weights (masks will be meaningless).", args.model
        )
    server = _bind(args.host, args.port)
    try:
        app = create_app(
            {
                "IMAGES_DIR": args.images,
                "ANNOTATIONS_DIR": args.annotations,
                "MODEL_TYPE": args.model,
                "CHECKPOINT": args.checkpoint,
                "DEVICE": args.device,
                "TOKEN": token,
                "PRECOMPUTE": not args.no_precompute,
            }
        )
        if args.model == "tiny" and args.checkpoint is None:
            from trimask.models.build import model_identity

            model_identity("tiny")  # fails now, with a clear message, if the bundled weights are missing
        server.app = app
        if not args.no_precompute:
            # Load the model now: a checkpoint that does not fit fails here, in one line, not at the first click.
            print(f"trimask: loading the {args.model} model ...", flush=True)
            app.extensions["trimask"].embeddings.embedder()
            threading.Thread(target=_warm_up, args=(app,), name="trimask-warm-up", daemon=True).start()
        host = args.host if ":" not in args.host else f"[{args.host}]"
        url = f"http://{host}:{server.port}/"
        if token:
            url += f"?token={token}"
        state = app.extensions["trimask"]
        print(
            f"trimask: annotating {len(state.index)} images in {state.images_dir} with {args.model}; "
            f"saving to {state.annotations_dir}",
            flush=True,
        )
        print(f"trimask: open {url}  (Ctrl+C stops)", flush=True)
        # SIGTERM (service managers, `kill`) stops like Ctrl+C; saves are committed per request anyway.
        signal.signal(signal.SIGTERM, _interrupt)
        server.serve_forever()  # returns on Ctrl+C / SIGTERM (werkzeug swallows the KeyboardInterrupt)
        print("trimask: stopped", file=sys.stderr)
    except KeyboardInterrupt:
        print("trimask: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
