"""The exported decoder of a model, made once and kept on disk.

Layout: ``<cache_dir>/<model identity>/decoder.onnx`` and ``decoder.quant2.onnx``
(plus ``decoder_prepare_v3.onnx``, ``decoder_prepared_v3[.quant2].onnx`` and the hover
previews' ``decoder_hover_v3[.quant2].onnx`` of the optional fast path when asked for; a
cache made before the hover graph existed gets it on first request, beside its unchanged
pair; the ``_v3`` names the factored fast-path format, so a cache
holding an earlier format's files is never paired with the new ones: v2's per-image
``upscaling`` tensor is not centred, v3's is).
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
import threading
from collections.abc import Iterator
from pathlib import Path

from trimask.errors import TrimaskError
from trimask.export.hover_decoder import export_hover_decoder
from trimask.export.onnx_decoder import export_decoder, quantize_file
from trimask.export.prepared_decoder import export_prepared_decoder

# part -> file stem; "prepare" / "prepared" are the optional two-graph fast path
# (see trimask.export.prepared_decoder), "hover" its per-click graph cut to a hover
# preview's one mask (trimask.export.hover_decoder); the three are exported together.
# The fast path's stems carry its format version: bump it whenever its inputs/outputs change.
FAST_PATH_FORMAT = "v3"
PARTS = {
    "decoder": "decoder",
    "prepare": f"decoder_prepare_{FAST_PATH_FORMAT}",
    "prepared": f"decoder_prepared_{FAST_PATH_FORMAT}",
    "hover": f"decoder_hover_{FAST_PATH_FORMAT}",
}
# A quantized file's suffix carries the quantization rule's version, so files cached under an older rule
# are made again (2: matrices laid out by hand stay fp32, see onnx_decoder._laid_out).
QUANTIZED_SUFFIX = ".quant2"


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
    part: str = "decoder",
) -> Path:
    """Path of an ONNX file of this model's decoder, exporting it on first use.

    part: "decoder" (decoder.onnx, the complete graph), or the optional fast
    path's "prepare" (decoder_prepare.onnx, never quantized: it is small),
    "prepared" (decoder_prepared.onnx) and "hover" (decoder_hover.onnx, the
    prepared graph for a hover preview's one mask). A quantized file is made from the fp32
    one (exported first if needed). Raises TrimaskError when the cache folder
    cannot be written or the model cannot be built (unknown type, unreadable
    checkpoint).
    """
    from trimask.models.build import build_sam, model_identity

    if part not in PARTS:
        raise TrimaskError(f"unknown decoder part {part!r}; choose one of {', '.join(PARTS)}")
    quantize = quantize and part != "prepare"
    folder = Path(cache_dir) / model_identity(model_type, checkpoint)
    path = folder / (PARTS[part] + (QUANTIZED_SUFFIX if quantize else "") + ".onnx")
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrimaskError(f"cannot create the decoder cache folder {folder}: {exc.strerror}") from exc
    if quantize:
        fp32 = decoder_file(model_type, checkpoint, cache_dir, part=part)
        with _exclusive(folder / (path.name + ".lock")):
            if not path.is_file():
                tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    quantize_file(fp32, tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return path
    lock_name = "decoder" if part == "decoder" else "prepared"  # the fast-path files come together
    with _exclusive(folder / (lock_name + ".lock")):
        if not path.is_file():  # another caller may have finished while we waited
            sam = build_sam(model_type, checkpoint)
            if part == "decoder":
                export_decoder(sam, path)
            else:
                fast = {name: folder / (PARTS[name] + ".onnx") for name in ("prepare", "prepared", "hover")}
                if not (fast["prepare"].is_file() and fast["prepared"].is_file()):
                    export_prepared_decoder(sam, fast["prepare"], fast["prepared"])
                if not fast["hover"].is_file():
                    export_hover_decoder(sam, fast["hover"])
    return path
