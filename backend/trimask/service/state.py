"""What every request handler reaches for: the service's state and a database connection."""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flask import current_app, g

from trimask.errors import TrimaskError
from trimask.service import storage
from trimask.service.embeddings import EmbeddingService
from trimask.service.image_index import ImageIndex, build_index


class ServiceUnavailable(TrimaskError):
    """The model or decoder cannot be provided right now (HTTP 503)."""


class PreconditionRequired(TrimaskError):
    """A change must name the version it was based on (HTTP 428)."""


@dataclass
class ServiceState:
    """One app's folders, image index, embeddings and decoder provider."""

    images_dir: Path
    annotations_dir: Path
    cache_dir: Path
    db_path: Path
    index: ImageIndex
    embeddings: EmbeddingService
    decoder_file: Callable[[bool, str], Path]  # (quantized, part) -> path of that ONNX graph
    decoder_parts: tuple[str, ...]  # the graphs decoder_file offers: "decoder", and maybe the fast path's
    model_type: str
    frontend_dist: Path
    ort_dirs: list[Path]
    token: str | None
    index_lock: threading.Lock = field(default_factory=threading.Lock)

    def rescan(self) -> ImageIndex:
        """Scan the images folder again (new files get new ids; known ones keep theirs)."""
        with self.index_lock:
            conn = storage.connect(self.db_path)
            try:
                self.index = build_index(self.images_dir, conn, exclude=[self.annotations_dir])
            finally:
                conn.close()
            self.embeddings.index = self.index
            return self.index


def current() -> ServiceState:
    return current_app.extensions["trimask"]


def db() -> sqlite3.Connection:
    """This request's database connection (opened on first use, closed at teardown)."""
    if "trimask_db" not in g:
        g.trimask_db = storage.connect(current().db_path, migrate_schema=False)
    return g.trimask_db


def close_db(_exc: BaseException | None = None) -> None:
    conn = g.pop("trimask_db", None)
    if conn is not None:
        conn.close()
