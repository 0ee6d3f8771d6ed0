"""Image embeddings for the browser: computed once, cached, precomputed ahead of the annotator.

The encoder is the expensive half of SAM, so the server runs it once per image and
ships the result (fp16, 2 MiB for [1, 256, 64, 64]); every click after that is
decoded in the browser. Guarantees:

- one computation per image: a per-image lock in this process, and the embedding
  cache's own file lock across processes;
- after image *i* is requested, a background thread computes the next images in
  listing order, so moving on is instant;
- the model is loaded lazily, on the first embedding that is not already cached.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trimask.service.image_index import ImageIndex, ImageRecord

log = logging.getLogger(__name__)

EMBEDDING_SHAPE = (1, 256, 64, 64)
PRECOMPUTE_AHEAD = 3
MEMORY_CACHE_ITEMS = 8  # 2 MiB each


class EmbedderLike(Protocol):
    """What the service needs of ``trimask.embedder.Embedder`` (tests inject fakes)."""

    identity: str

    def embed_path(self, path: Path) -> np.ndarray:  # float32 [1, 256, 64, 64]
        ...


@dataclass(frozen=True)
class EmbeddingBlob:
    """An embedding ready to send: raw little-endian fp16 bytes of ``EMBEDDING_SHAPE``."""

    data: bytes
    model_id: str
    etag: str


def _etag(image_hash: str, model_id: str) -> str:
    return f'"{image_hash[:32]}-{model_id}"'


class FileHashes:
    """content_hash memoized by (path, mtime, size): hashing a photo costs milliseconds each time."""

    def __init__(self) -> None:
        self._memo: dict[Path, tuple[int, int, str]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> str:
        from trimask.image_io import content_hash

        st = os.stat(path)
        with self._lock:
            hit = self._memo.get(path)
        if hit and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            return hit[2]
        digest = content_hash(path)
        with self._lock:
            self._memo[path] = (st.st_mtime_ns, st.st_size, digest)
        return digest


class EmbeddingService:
    """Serves embeddings of the images in ``index``.

    Args:
        index: the image folder.
        make_embedder: builds the embedder on first need (loading the model).
        model_id: the model identity without loading the model, or None to take
            it from the embedder.
        device: the device name shown in ``/api/status``, or a callable giving it (resolving
            "auto" imports torch, which status can do later rather than at start).
        cache: an ``EmbeddingCache`` (get/put/get_or_compute) or None.
        precompute: whether to compute the next images in the background.
    """

    def __init__(
        self,
        index: ImageIndex,
        make_embedder: Callable[[], EmbedderLike],
        *,
        model_id: Callable[[], str] | None,
        device: str | Callable[[], str],
        cache: Any | None,
        precompute: bool = True,
    ):
        self.index = index
        self._device = device
        self.cache = cache
        self.hashes = FileHashes()
        self._make_embedder = make_embedder
        self._model_id_fn = model_id
        self._model_id: str | None = None
        self._embedder: EmbedderLike | None = None
        self._embedder_lock = threading.Lock()
        self._compute_lock = threading.Lock()  # one encoder run at a time: they would only fight for cores
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        self._memory: OrderedDict[str, EmbeddingBlob] = OrderedDict()
        self._memory_lock = threading.Lock()
        self._ready: set[int] = set()  # image ids known to be embedded (this run or found cached)
        self._failed: dict[int, str] = {}
        self._queue: queue.Queue[int] = queue.Queue()
        self._queued: set[int] = set()
        self._precompute = precompute
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._closed = threading.Event()

    # ------------------------------------------------------------ model
    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = self._model_id_fn() if self._model_id_fn else self.embedder().identity
        return self._model_id

    @property
    def device(self) -> str:
        if callable(self._device):
            self._device = self._device()
        return self._device

    @property
    def known_model_id(self) -> str | None:
        """The model identity if already computed (it hashes the checkpoint, so status never waits on it)."""
        return self._model_id

    def embedder(self) -> EmbedderLike:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = self._make_embedder()
            return self._embedder

    # ------------------------------------------------------------ embeddings
    def etag(self, record: ImageRecord) -> str:
        """Strong ETag of an image's embedding: image content + model identity (no computation)."""
        return _etag(self.hashes.get(record.path), self.model_id)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._key_locks_guard:
            return self._key_locks.setdefault(key, threading.Lock())

    def _remember(self, key: str, blob: EmbeddingBlob) -> None:
        with self._memory_lock:
            self._memory[key] = blob
            self._memory.move_to_end(key)
            while len(self._memory) > MEMORY_CACHE_ITEMS:
                self._memory.popitem(last=False)

    def _recall(self, key: str) -> EmbeddingBlob | None:
        with self._memory_lock:
            blob = self._memory.get(key)
            if blob is not None:
                self._memory.move_to_end(key)
            return blob

    def get(self, record: ImageRecord) -> EmbeddingBlob:
        """The embedding of one image, computing it (once) if no cache holds it."""
        image_hash = self.hashes.get(record.path)
        model_id = self.model_id
        key = f"{image_hash}-{model_id}"
        blob = self._recall(key)
        if blob is not None:
            return blob
        with self._key_lock(key):
            blob = self._recall(key)  # another thread may have finished it while we waited
            if blob is not None:
                return blob
            emb = self.cache.get(image_hash, model_id) if self.cache is not None else None
            if emb is None:
                embedder = self.embedder()
                with self._compute_lock:
                    emb = embedder.embed_path(record.path)
            arr = np.ascontiguousarray(np.asarray(emb, dtype="<f2").reshape(EMBEDDING_SHAPE))
            blob = EmbeddingBlob(arr.tobytes(), model_id, _etag(image_hash, model_id))
            self._remember(key, blob)
            self._ready.add(record.id)
            return blob

    # ------------------------------------------------------------ background
    def prefetch_after(self, image_id: int, count: int = PRECOMPUTE_AHEAD) -> None:
        """Queue the images listed after ``image_id`` for background computation."""
        if not self._precompute:
            return
        for record in self.index.following(image_id, count):
            self.enqueue(record.id)

    def enqueue(self, image_id: int) -> None:
        if not self._precompute or image_id in self._ready or image_id in self._failed:
            return
        if image_id in self._queued:
            return
        self._queued.add(image_id)
        self._queue.put(image_id)
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="trimask-precompute", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while not self._closed.is_set():
            try:
                image_id = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.get(self.index.get(image_id))
            except Exception as exc:  # a bad file must not stop the worker; the request path reports it
                self._failed[image_id] = str(exc)
                log.warning("precomputing the embedding of image %s failed: %s", image_id, exc)
            finally:
                self._queued.discard(image_id)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the background queue is empty (for tests and benchmarks)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._queued:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._closed.set()

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return {
            "embeddings_cached": len(self._ready),
            "embeddings_total": len(self.index),
            "embeddings_queued": len(self._queued),
        }

    def survey_cache(self) -> None:
        """Count images whose embedding a cache already holds (e.g. from ``trimask embed``).

        Runs in the background at start; it reads each file to hash it.
        """
        if self.cache is None:
            return
        for record in self.index.records:
            if self._closed.is_set():
                return
            if record.id in self._ready:
                continue
            try:
                image_hash = self.hashes.get(record.path)
                found = self.cache.path(image_hash, self.model_id).is_file()
            except Exception:
                continue
            if found:
                self._ready.add(record.id)
