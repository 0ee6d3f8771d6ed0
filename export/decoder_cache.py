"""The exported decoder of a model, made once and kept on disk.

Layout: ``<cache_dir>/<model identity>/decoder.onnx`` and ``decoder.quant.onnx``.
The identity (``model_identity``) names the weights, so a different checkpoint
gets its own files and a stale decoder is never served. Files appear by
``os.replace`` of a finished temporary file, and an exclusive ``flock`` on a
lock file next to them makes concurrent callers (threads or processes) wait
for the first export instead of repeating it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from trimask.errors import TrimaskError
from trimask.export.onnx_decoder import export_decoder, quantize_file

FP32_NAME = "decoder.onnx"
QUANT_NAME = "decoder.quant.onnx"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on lock_path (each call opens its own descriptor,
    so it also excludes other threads of this process)."""
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def decoder_file(
    model_type: str,
    checkpoint: str | Path | None,
    cache_dir: str | Path,
    *,
    quantize: bool = False,
) -> Path:
    """Path of the decoder ONNX file for this model, exporting it on first use.

    The quantized file is made from the fp32 one (exported first if needed).
    Raises TrimaskError when the cache folder cannot be written or the model
    cannot be built (unknown type, unreadable checkpoint).
    """
    from trimask.models.build import build_sam, model_identity

    folder = Path(cache_dir) / model_identity(model_type, checkpoint)
    path = folder / (QUANT_NAME if quantize else FP32_NAME)
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrimaskError(f"cannot create the decoder cache folder {folder}: {exc.strerror}") from exc
    if quantize:
        fp32 = decoder_file(model_type, checkpoint, cache_dir)
        with _exclusive(folder / (QUANT_NAME + ".lock")):
            if not path.is_file():
                tmp = folder / f".{QUANT_NAME}.{os.getpid()}.tmp"
                try:
                    quantize_file(fp32, tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return path
    with _exclusive(folder / (FP32_NAME + ".lock")):
        if not path.is_file():  # another caller may have finished while we waited
            sam = build_sam(model_type, checkpoint)
            export_decoder(sam, path)
    return path
