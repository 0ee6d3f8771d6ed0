"""The embedder: device and dtype choice, CPU numerics, batching, and the cache path.

The CUDA path cannot run on the CI machines; its dtype choice is tested here
through ``choose_compute_dtype`` and its autocast path through CPU autocast
(bench/gpu_agreement.py measures the real thing on a GPU).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trimask import embedder as embedder_module
from trimask.embedder import (
    Embedder,
    autocast_context,
    available_cores,
    choose_compute_dtype,
    resolve_device,
)
from trimask.embedding_cache import EmbeddingCache
from trimask.errors import TrimaskError
from trimask.image_io import content_hash, load_image
from trimask.preprocess import preprocess


@pytest.fixture(scope="module")
def tiny() -> Embedder:
    """The tiny architecture with seeded random weights: fast enough for unit tests on 2 cores."""
    return Embedder("tiny", device="cpu", random_init=True)


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _save(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- device and dtype ---------------------------------------------------------------------


def test_auto_picks_cuda_only_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrimaskError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(TrimaskError, match="cuda:3"):
        resolve_device("cuda:3")
    with pytest.raises(TrimaskError, match="Unknown device"):
        resolve_device("tpu")


def test_compute_dtype_is_float32_on_cpu_and_bf16_or_fp16_on_cuda() -> None:
    assert choose_compute_dtype(torch.device("cpu")) == torch.float32
    assert choose_compute_dtype(torch.device("cuda"), bf16_supported=True) == torch.bfloat16
    assert choose_compute_dtype(torch.device("cuda:1"), bf16_supported=False) == torch.float16


def test_autocast_is_used_only_below_float32() -> None:
    with autocast_context(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_cpu_embedder_uses_every_available_core(tiny: Embedder) -> None:
    Embedder("tiny", device="cpu", random_init=True, sam=tiny.sam)
    assert torch.get_num_threads() == available_cores()


# --- numerics --------------------------------------------------------------------------------


def test_embed_image_is_the_encoder_applied_to_the_official_preprocessing(tiny: Embedder) -> None:
    image = _image(0, 300, 200)
    out = tiny.embed_image(image)
    assert out.dtype == np.float32 and out.shape == (1, 256, 64, 64)
    with torch.inference_mode():
        expected = tiny.sam.image_encoder(preprocess(image)).numpy()
    np.testing.assert_array_equal(out, expected)
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")


def test_embed_batch_equals_one_image_at_a_time(tiny: Embedder) -> None:
    images = [_image(1, 120, 200), _image(2, 256, 64), _image(3, 90, 90)]
    batched = Embedder("tiny", device="cpu", random_init=True, batch_size=2, sam=tiny.sam)
    out = batched.embed_batch(images)
    assert out.shape == (3, 256, 64, 64) and out.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_allclose(out[i : i + 1], tiny.embed_image(image), rtol=1e-4, atol=1e-5)
    assert batched.embed_batch([]).shape == (0, 256, 64, 64)


def test_reduced_precision_path_returns_float32_close_to_float32(tiny: Embedder) -> None:
    # Same code path as CUDA bf16 (autocast + cast back), exercised with CPU autocast.
    image = _image(4, 200, 160)
    low = Embedder("tiny", device="cpu", random_init=True, dtype=torch.bfloat16, sam=tiny.sam)
    out = low.embed_image(image)
    reference = tiny.embed_image(image)
    assert out.dtype == np.float32
    assert not np.array_equal(out, reference)  # it really computed in bf16
    assert _cosine(out, reference) > 0.99


def test_wrong_image_array_is_refused(tiny: Embedder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        tiny.embed_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        tiny.embed_image(np.zeros((10, 10), np.uint8))


# --- files and the cache -------------------------------------------------------------------


def test_embed_path_computes_once_then_reads_the_cache(tiny: Embedder, tmp_path: Path, monkeypatch) -> None:
    path = _save(tmp_path / "a.png", _image(5, 80, 120))
    cache = EmbeddingCache(tmp_path / "cache")
    cached = Embedder("tiny", device="cpu", random_init=True, cache=cache, sam=tiny.sam)
    assert cached.identity == "tiny-random"
    calls = []
    original = cached.embed_image
    monkeypatch.setattr(cached, "embed_image", lambda image: calls.append(1) or original(image))
    first = cached.embed_path(path)
    second = cached.embed_path(path)
    assert len(calls) == 1
    assert first.dtype == np.float32 and first.shape == (1, 256, 64, 64)
    np.testing.assert_array_equal(first, second)
    # What it returns is the cached fp16 value, the same numbers the browser receives.
    expected = tiny.embed_image(load_image(path)).astype(np.float16)
    np.testing.assert_array_equal(cache.get(content_hash(path), "tiny-random"), expected)
    np.testing.assert_array_equal(first, expected.astype(np.float32))
    # A caller that already hashed the file passes the hash; the same entry is found.
    np.testing.assert_array_equal(cached.embed_path(path, image_hash=content_hash(path)), first)
    assert len(calls) == 1


def test_embed_path_without_cache_is_exact_float32(tiny: Embedder, tmp_path: Path) -> None:
    path = _save(tmp_path / "b.png", _image(6, 50, 70))
    np.testing.assert_array_equal(tiny.embed_path(path), tiny.embed_image(load_image(path)))


def test_embed_path_of_a_bad_file_names_it(tiny: Embedder, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(TrimaskError, match="broken.jpg"):
        tiny.embed_path(bad)


def test_embed_files_batches_reads_cached_ones_and_reports_bad_ones(tiny: Embedder, tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"{i}.png", _image(10 + i, 64 + 8 * i, 96)) for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    cache = EmbeddingCache(tmp_path / "cache")
    emb = Embedder("tiny", device="cpu", random_init=True, cache=cache, batch_size=2, sam=tiny.sam)
    emb.embed_path(paths[1])  # one already cached
    results = emb.embed_files([paths[0], bad, paths[1], paths[2]])
    assert isinstance(results[1], TrimaskError) and "bad.png" in str(results[1])
    for result, path in zip([results[0], results[2], results[3]], paths):
        assert isinstance(result, np.ndarray) and result.shape == (1, 256, 64, 64)
        np.testing.assert_allclose(result, tiny.embed_image(load_image(path)), rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(result, emb.embed_path(path))
        assert cache.get(content_hash(path), emb.identity) is not None


def test_identity_names_the_checkpoint(tiny: Embedder, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRIMASK_HASH_CACHE", str(tmp_path / "hashes.json"))
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny.sam.state_dict(), checkpoint)
    from_file = Embedder("tiny", checkpoint, device="cpu")
    assert from_file.identity.startswith("tiny-") and len(from_file.identity) == len("tiny-") + 16
    assert from_file.identity != "tiny-random"
    image = _image(7, 64, 64)
    np.testing.assert_array_equal(from_file.embed_image(image), tiny.embed_image(image))


def test_random_init_with_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Embedder("tiny", tmp_path / "x.pt", device="cpu", random_init=True)


def test_module_has_no_dependency_on_the_reference_implementation() -> None:
    source = Path(embedder_module.__file__).read_text()
    assert "segment_anything" not in source


# --- the whole path against the official implementation ------------------------------------


def test_embedding_of_a_file_matches_the_official_predictor_around_the_same_encoder(
    tiny: Embedder, tmp_path: Path
) -> None:
    # The official SamPredictor does its own resize, normalization and padding; give it
    # our encoder so this proves the whole file -> embedding pipeline around it (the
    # encoders' own parity is tested with the models).
    segment_anything = pytest.importorskip("segment_anything")
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    official = Sam(
        image_encoder=tiny.sam.image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
        ),
    ).eval()
    predictor = segment_anything.SamPredictor(official)
    for seed, (height, width) in enumerate([(480, 640), (700, 333)]):
        image = _image(20 + seed, height, width)
        path = _save(tmp_path / f"photo{seed}.png", image)
        predictor.set_image(image)
        expected = predictor.get_image_embedding().numpy()
        got = tiny.embed_path(path)
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert rel < 1e-5, rel
