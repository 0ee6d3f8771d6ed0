"""The embedding cache: fp16 round trip, atomic writes, one computation across processes."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from trimask.embedding_cache import EMBEDDING_SHAPE, EmbeddingCache
from trimask.errors import TrimaskError

HASH = "ab" * 32
MODEL = "vit_b-0123456789abcdef"


def _embedding(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(EMBEDDING_SHAPE).astype(np.float32)


def test_put_then_get_round_trips_through_float16(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    emb = _embedding()
    stored = cache.put(HASH, MODEL, emb)
    loaded = cache.get(HASH, MODEL)
    assert loaded is not None and loaded.dtype == np.float16 and loaded.shape == EMBEDDING_SHAPE
    np.testing.assert_array_equal(loaded, emb.astype(np.float16))
    np.testing.assert_array_equal(stored, loaded)
    assert cache.path(HASH, MODEL) == tmp_path / MODEL / f"{HASH}.npy"


def test_missing_entry_is_none_and_keys_are_separate(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    assert cache.get(HASH, MODEL) is None
    cache.put(HASH, MODEL, _embedding())
    assert cache.get(HASH, "vit_h-0000000000000000") is None
    assert cache.get("cd" * 32, MODEL) is None


def test_unbatched_embedding_is_stored_with_its_batch_axis(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.put(HASH, MODEL, _embedding()[0])
    assert cache.get(HASH, MODEL).shape == EMBEDDING_SHAPE


def test_wrong_shape_or_non_finite_embedding_is_refused(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(TrimaskError, match="shape"):
        cache.put(HASH, MODEL, np.zeros((1, 256, 32, 32), np.float32))
    bad = _embedding()
    bad[0, 0, 0, 0] = 1e6  # overflows float16
    with pytest.raises(TrimaskError, match="infinite"):
        cache.put(HASH, MODEL, bad)
    assert cache.get(HASH, MODEL) is None


@pytest.mark.parametrize("key", ["../escape", "a/b", ".hidden", "", "x" * 300])
def test_keys_that_are_not_plain_file_names_are_refused(tmp_path: Path, key: str) -> None:
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError):
        cache.get(HASH, key)
    with pytest.raises(ValueError):
        cache.get(key, MODEL)


def test_get_or_compute_computes_once_then_reads_the_cache(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return _embedding(1)

    first = cache.get_or_compute(HASH, MODEL, compute)
    second = cache.get_or_compute(HASH, MODEL, compute)
    # A new cache object over the same folder (as after a restart) also reuses it.
    third = EmbeddingCache(tmp_path).get_or_compute(HASH, MODEL, compute)
    assert len(calls) == 1
    assert first.dtype == np.float16
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"garbage, not numpy"),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated data
        lambda p: np.save(p, np.zeros((1, 256, 32, 32), np.float16)),  # wrong shape
        lambda p: np.save(p, np.zeros(EMBEDDING_SHAPE, np.float32)),  # wrong dtype
    ],
    ids=["empty", "garbage", "truncated", "wrong-shape", "wrong-dtype"],
)
def test_damaged_entry_counts_as_missing_and_is_recomputed(tmp_path: Path, damage) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.put(HASH, MODEL, _embedding(0))
    damage(cache.path(HASH, MODEL))
    assert cache.get(HASH, MODEL) is None
    fresh = _embedding(2)
    result = cache.get_or_compute(HASH, MODEL, lambda: fresh)
    np.testing.assert_array_equal(result, fresh.astype(np.float16))
    np.testing.assert_array_equal(cache.get(HASH, MODEL), fresh.astype(np.float16))


def test_a_failed_write_leaves_no_entry_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EmbeddingCache(tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.put(HASH, MODEL, _embedding())
    monkeypatch.undo()
    assert cache.get(HASH, MODEL) is None
    assert [p.name for p in (tmp_path / MODEL).iterdir() if p.suffix == ".tmp"] == []


def test_a_failed_computation_caches_nothing_and_releases_the_lock(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)

    def fails() -> np.ndarray:
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        cache.get_or_compute(HASH, MODEL, fails)
    assert cache.get(HASH, MODEL) is None
    assert cache.get_or_compute(HASH, MODEL, _embedding).shape == EMBEDDING_SHAPE


# --- several processes -------------------------------------------------------------------
# Child entry points live at module level so the "spawn" start method can import them.


def _compute_and_count(root: str, counter: str, start: float) -> None:
    """Wait for a common start time, then get_or_compute with a slow computation that logs each call."""
    time.sleep(max(0.0, start - time.time()))

    def compute() -> np.ndarray:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other processes arrive while it runs
        return _embedding(7)

    result = EmbeddingCache(root).get_or_compute(HASH, MODEL, compute)
    if not np.array_equal(result, _embedding(7).astype(np.float16)):
        raise SystemExit(3)


def _killed_while_writing(root: str, ready: str) -> None:
    """get_or_compute whose write stops for good after the data is written but before the rename."""

    def stall_in_fsync(fd: int) -> None:
        Path(ready).write_text("writing")
        time.sleep(600)

    os.fsync = stall_in_fsync  # type: ignore[assignment]
    EmbeddingCache(root).get_or_compute(HASH, MODEL, lambda: _embedding(3))


def test_two_processes_asking_for_the_same_entry_compute_it_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    counter = tmp_path / "calls.txt"
    start = time.time() + 3.0  # after the children have imported numpy and trimask
    procs = [
        ctx.Process(target=_compute_and_count, args=(str(tmp_path / "cache"), str(counter), start))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(counter.read_text().splitlines()) == 1
    # And none of them recomputes it afterwards.
    _compute_and_count(str(tmp_path / "cache"), str(counter), 0.0)
    assert len(counter.read_text().splitlines()) == 1


def test_a_process_killed_mid_write_leaves_nothing_that_is_read(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = tmp_path / "ready"
    root = tmp_path / "cache"
    child = ctx.Process(target=_killed_while_writing, args=(str(root), str(ready)))
    child.start()
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline and child.is_alive():
        time.sleep(0.05)
    assert ready.exists(), "the child never reached the write"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)

    cache = EmbeddingCache(root)
    leftovers = [p for p in (root / MODEL).iterdir() if p.suffix == ".tmp"]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-done write is there...
    assert not cache.path(HASH, MODEL).exists()
    assert cache.get(HASH, MODEL) is None  # ...but never read
    # The dead child's lock is gone with it, so this neither hangs nor reads the temporary.
    fresh = _embedding(4)
    np.testing.assert_array_equal(cache.get_or_compute(HASH, MODEL, lambda: fresh), fresh.astype(np.float16))
