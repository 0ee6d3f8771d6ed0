"""decoder_file: exported once per model identity, atomically, even with concurrent callers."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from trimask.errors import TrimaskError
from trimask.export import decoder_cache
from trimask.models.build import model_identity


def _fake_export(log: Path, delay: float = 0.3):
    """An export_decoder stand-in that records each call and is slow enough to overlap."""

    def export(sam, out_path, *, quantize=False):
        with open(log, "a") as handle:
            handle.write("export\n")
        time.sleep(delay)
        Path(out_path).write_bytes(b"onnx")
        return Path(out_path)

    return export


def test_first_call_exports_into_the_identity_folder_and_later_calls_reuse_it(tmp_path):
    path = decoder_cache.decoder_file("vit_b", None, tmp_path)
    assert path == tmp_path / model_identity("vit_b") / "decoder.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()][:2] == ["iou_predictions", "low_res_masks"]
    mtime = path.stat().st_mtime_ns
    assert decoder_cache.decoder_file("vit_b", None, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    # No temporary files are left next to it.
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == ["decoder.onnx"]


def test_quantized_file_is_made_from_the_cached_fp32_file(tmp_path):
    quant = decoder_cache.decoder_file("vit_b", None, tmp_path, quantize=True)
    fp32 = tmp_path / model_identity("vit_b") / "decoder.onnx"
    assert quant.name == f"decoder{decoder_cache.QUANTIZED_SUFFIX}.onnx" and fp32.is_file()
    assert quant.stat().st_size < 0.4 * fp32.stat().st_size
    ort.InferenceSession(str(quant), providers=["CPUExecutionProvider"])


def test_concurrent_threads_export_once(tmp_path, monkeypatch):
    log = tmp_path / "log"
    monkeypatch.setattr(decoder_cache, "export_decoder", _fake_export(log))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        decoder_cache.decoder_file("vit_b", None, tmp_path / "cache"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert log.read_text().count("export") == 1


_CHILD = """
import sys, time
from pathlib import Path
from trimask.export import decoder_cache

def export(sam, out_path, *, quantize=False):
    with open(sys.argv[2], "a") as handle:
        handle.write("export\\n")
    time.sleep(0.5)
    Path(out_path).write_bytes(b"onnx")
    return Path(out_path)

decoder_cache.export_decoder = export
print(decoder_cache.decoder_file("vit_b", None, sys.argv[1]))
"""


def test_concurrent_processes_export_once(tmp_path):
    log = tmp_path / "log"
    cache = tmp_path / "cache"
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=120)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs[0] == outputs[1] == str(cache / model_identity("vit_b") / "decoder.onnx")
    assert log.read_text().count("export") == 1
    assert Path(outputs[0]).read_bytes() == b"onnx"


def test_unknown_model_and_unwritable_folder_raise_one_clear_error(tmp_path):
    with pytest.raises(TrimaskError, match="vit_z"):
        decoder_cache.decoder_file("vit_z", None, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrimaskError, match="cache folder"):
        decoder_cache.decoder_file("vit_b", None, blocker / "cache")


def test_fast_path_parts_are_exported_together_and_quantized_on_request(tmp_path):
    prepare = decoder_cache.decoder_file("vit_b", None, tmp_path, part="prepare")
    folder = tmp_path / model_identity("vit_b")
    assert prepare == folder / f"decoder_prepare_{decoder_cache.FAST_PATH_FORMAT}.onnx"
    assert (folder / f"decoder_prepared_{decoder_cache.FAST_PATH_FORMAT}.onnx").is_file()  # made in the same export
    assert decoder_cache.decoder_file("vit_b", None, tmp_path, part="prepared") == folder / f"decoder_prepared_{decoder_cache.FAST_PATH_FORMAT}.onnx"
    hover = folder / f"decoder_hover_{decoder_cache.FAST_PATH_FORMAT}.onnx"
    assert hover.is_file()  # made in the same export
    assert decoder_cache.decoder_file("vit_b", None, tmp_path, part="hover") == hover
    # The prepare graph is never quantized (it is small); the per-click graph can be.
    assert decoder_cache.decoder_file("vit_b", None, tmp_path, part="prepare", quantize=True) == prepare
    quant = decoder_cache.decoder_file("vit_b", None, tmp_path, part="prepared", quantize=True)
    assert quant == folder / f"decoder_prepared_{decoder_cache.FAST_PATH_FORMAT}{decoder_cache.QUANTIZED_SUFFIX}.onnx"
    ort.InferenceSession(str(quant), providers=["CPUExecutionProvider"])
    quant_hover = decoder_cache.decoder_file("vit_b", None, tmp_path, part="hover", quantize=True)
    assert quant_hover == folder / f"decoder_hover_{decoder_cache.FAST_PATH_FORMAT}{decoder_cache.QUANTIZED_SUFFIX}.onnx"
    outputs = {o.name for o in ort.InferenceSession(str(quant_hover), providers=["CPUExecutionProvider"]).get_outputs()}
    assert {"best_token", "display_mask"} <= outputs
    with pytest.raises(TrimaskError, match="part"):
        decoder_cache.decoder_file("vit_b", None, tmp_path, part="encoder")


def test_a_cache_made_before_the_hover_graph_gets_it_and_keeps_its_pair(tmp_path):
    prepared = decoder_cache.decoder_file("vit_b", None, tmp_path, part="prepared")
    folder = prepared.parent
    hover = folder / f"decoder_hover_{decoder_cache.FAST_PATH_FORMAT}.onnx"
    hover.unlink()
    before = {path: path.stat().st_mtime_ns for path in folder.glob("decoder_prepare*.onnx")}
    assert decoder_cache.decoder_file("vit_b", None, tmp_path, part="hover") == hover
    outputs = {o.name for o in ort.InferenceSession(str(hover), providers=["CPUExecutionProvider"]).get_outputs()}
    assert {"best_token", "display_mask"} <= outputs
    assert {path: path.stat().st_mtime_ns for path in folder.glob("decoder_prepare*.onnx")} == before


def test_a_first_format_fast_path_file_in_the_cache_is_not_served(tmp_path):
    """An old cache's decoder_prepared.onnx (layer-0 projections only) or _v2 file (upscaling not centred) stays unused."""
    folder = tmp_path / model_identity("vit_b")
    folder.mkdir(parents=True)
    (folder / "decoder_prepared.onnx").write_bytes(b"old format")
    (folder / "decoder_prepared_v2.onnx").write_bytes(b"second format: upscaling not centred")
    path = decoder_cache.decoder_file("vit_b", None, tmp_path, part="prepared")
    assert path.name == f"decoder_prepared_{decoder_cache.FAST_PATH_FORMAT}.onnx"
    names = {i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()}
    assert "mask_input" in names
