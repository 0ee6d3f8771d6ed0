"""On-disk cache of image embeddings, keyed by image content hash and model identity.

Layout: ``<root>/<model_id>/<image_hash>.npy`` holding ``np.float16``
``[1, 256, 64, 64]`` (2 MiB each; fp16 halves disk and HTTP size and the
decoder is insensitive to that rounding). Next to each entry a
``<image_hash>.lock`` file serialises its computation.

Guarantees:

- atomic: an entry is written to a temporary file in the same folder, fsynced,
  then renamed over the final name (``os.replace``), so a reader sees either no
  file or a whole one; a process killed mid-write leaves only a temporary
  (``.<hash>.*.tmp``) that is never read;
- two processes (or threads) asking for the same missing entry compute it
  once: :meth:`EmbeddingCache.get_or_compute` holds an exclusive ``flock`` on
  the entry's lock file while it checks, computes and writes;
- a cached entry is never recomputed; an entry that cannot be read back as
  float16 ``[1, 256, 64, 64]`` (damaged, truncated, wrong shape) counts as
  missing and is replaced on the next :meth:`~EmbeddingCache.get_or_compute`.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from trimask.errors import TrimaskError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock, writes stay atomic
    fcntl = None  # type: ignore[assignment]

EMBEDDING_SHAPE: tuple[int, int, int, int] = (1, 256, 64, 64)
CACHE_DTYPE = np.float16

# Keys become file and folder names: allow no separators, no leading dot.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def _check_key(kind: str, key: str) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.match(key) or ".." in key:
        raise ValueError(f"{kind} {key!r} cannot be used as a cache file name")
    return key


def as_cache_array(embedding: np.ndarray) -> np.ndarray:
    """Validate an embedding and return it as C-contiguous float16 ``[1, 256, 64, 64]``.

    Accepts ``[256, 64, 64]`` or ``[1, 256, 64, 64]`` of any float dtype.
    Raises TrimaskError for another shape or non-finite values after the cast.
    """
    array = np.asarray(embedding)
    if array.shape == EMBEDDING_SHAPE[1:]:
        array = array[None]
    if array.shape != EMBEDDING_SHAPE:
        raise TrimaskError(f"An image embedding must have shape {list(EMBEDDING_SHAPE)}, not {list(array.shape)}.")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        array = np.ascontiguousarray(array, dtype=CACHE_DTYPE)
    if not np.isfinite(array).all():
        raise TrimaskError("The image embedding has NaN or infinite values (beyond float16 range); not caching it.")
    return array


class EmbeddingCache:
    """Embeddings on disk under ``root``; see the module docstring for the layout and guarantees."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    def path(self, image_hash: str, model_id: str) -> Path:
        """Where the entry for this image and model lives (whether or not it exists)."""
        return self.root / _check_key("model id", model_id) / f"{_check_key('image hash', image_hash)}.npy"

    def get(self, image_hash: str, model_id: str) -> np.ndarray | None:
        """The cached float16 ``[1, 256, 64, 64]`` embedding, or None when missing or unreadable."""
        return _read_entry(self.path(image_hash, model_id))

    def put(self, image_hash: str, model_id: str, embedding: np.ndarray) -> np.ndarray:
        """Store ``embedding`` (cast to float16) atomically, replacing any entry; returns what was stored."""
        array = as_cache_array(embedding)
        save_npy_atomic(self.path(image_hash, model_id), array)
        return array

    def get_or_compute(
        self, image_hash: str, model_id: str, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """The cached embedding, computing and storing it first if missing.

        ``compute()`` returns ``[1, 256, 64, 64]`` (or ``[256, 64, 64]``) floats.
        It runs at most once across all processes sharing ``root`` for a given
        key while the entry is missing; the others wait and read its result.

        Returns:
            np.float16 ``[1, 256, 64, 64]``.
        """
        final = self.path(image_hash, model_id)
        cached = _read_entry(final)
        if cached is not None:
            return cached
        with _exclusive_lock(final.with_suffix(".lock")):
            cached = _read_entry(final)  # another process may have written it while we waited
            if cached is not None:
                return cached
            array = as_cache_array(compute())
            save_npy_atomic(final, array)
            return array


def _read_entry(path: Path) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception:  # damaged header or short data: treat as missing so it gets rewritten
        return None
    if not isinstance(array, np.ndarray) or array.shape != EMBEDDING_SHAPE or array.dtype != CACHE_DTYPE:
        return None
    return array


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save ``array`` to ``path`` via a fsynced temporary in the same folder and a rename,
    so readers see the old file, no file, or the whole new one; never a partial one."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise TrimaskError(f"Cannot write to the folder {folder}: {exc.strerror or exc}.") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every OS or filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing; never deleted, as
    removing a lock file another process has open would let a third one lock a new file)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
    except OSError as exc:
        reason = exc.strerror or exc
        raise TrimaskError(f"Cannot write to the embedding cache folder {lock_path.parent}: {reason}.") from exc
    with handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
