"""``trimask embed``: .npy outputs, the server's cache, bad inputs and exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trimask.cli import main
from trimask.embedder import Embedder
from trimask.embedding_cache import EmbeddingCache
from trimask.image_io import content_hash, load_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-model checkpoint with seeded random weights (the bundled one may not exist yet)."""
    from trimask.models import build_sam

    path = tmp_path_factory.mktemp("weights") / "tiny-random.pt"
    torch.save(build_sam("tiny", random_init=True).state_dict(), path)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for name, size in (("a.png", (60, 90)), ("b.jpg", (100, 70))):
        path = folder / name
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIMASK_HASH_CACHE", str(tmp_path / "hashes.json"))


def _embed(*argv: str) -> int:
    return main(["embed", *argv])


def test_writes_float32_npy_per_image_and_fills_the_servers_cache(
    tmp_path: Path, images: list[Path], checkpoint: Path
) -> None:
    out = tmp_path / "out"
    annotations = tmp_path / "annotations"
    code = _embed("--model", "tiny", "--checkpoint", str(checkpoint), "--device", "cpu",
                  "--annotations", str(annotations), "--out", str(out), *map(str, images))
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.npy"]
    cache = EmbeddingCache(annotations / ".cache" / "embeddings")  # where `trimask serve` looks
    embedder = Embedder("tiny", checkpoint, device="cpu", cache=cache)
    for image in images:
        written = np.load(out / f"{image.stem}.npy")
        assert written.dtype == np.float32 and written.shape == (1, 256, 64, 64)
        cached = cache.get(content_hash(image), embedder.identity)
        assert cached is not None
        np.testing.assert_array_equal(written, cached.astype(np.float32))
        exact = embedder.embed_image(load_image(image))
        np.testing.assert_allclose(written, exact, rtol=1e-2, atol=2e-3)  # fp16 rounding only


def test_a_second_run_reads_the_cache_instead_of_computing(
    tmp_path: Path, images: list[Path], checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--cache", str(tmp_path / "c")]
    assert _embed(*common, "--out", str(tmp_path / "first"), str(images[0].parent)) == 0

    def must_not_run(self, images):
        raise AssertionError("the encoder ran although every embedding was cached")

    monkeypatch.setattr(Embedder, "embed_batch", must_not_run)
    assert _embed(*common, "--out", str(tmp_path / "second"), *map(str, images)) == 0
    for image in images:
        np.testing.assert_array_equal(
            np.load(tmp_path / "first" / f"{image.stem}.npy"), np.load(tmp_path / "second" / f"{image.stem}.npy")
        )


def test_no_cache_writes_the_exact_float32_output_and_touches_no_cache(
    tmp_path: Path, images: list[Path], checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _embed("--checkpoint", str(checkpoint), "--device", "cpu", "--no-cache",
                  "--out", "out", str(images[0])) == 0
    assert not (tmp_path / "annotations").exists()
    exact = Embedder("tiny", checkpoint, device="cpu").embed_image(load_image(images[0]))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "a.npy"), exact)


def test_a_bad_image_is_one_line_naming_it_the_others_are_written_and_exit_is_1(
    tmp_path: Path, images: list[Path], checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    out = tmp_path / "out"
    code = _embed("--checkpoint", str(checkpoint), "--device", "cpu", "--no-cache", "--batch-size", "2",
                  "--out", str(out), str(images[0]), str(bad), str(images[1]))
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.npy"]


def test_two_images_with_the_same_stem_are_refused_before_any_work(
    tmp_path: Path, images: list[Path], checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    twin = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(twin)
    code = _embed("--checkpoint", str(checkpoint), "--no-cache", "--out", str(tmp_path / "out"),
                  str(images[0]), str(twin))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.npy" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_image_or_a_mismatched_checkpoint_is_one_line_and_exit_1(
    tmp_path: Path, images: list[Path], checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _embed("--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), str(tmp_path / "gone.jpg")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.jpg" in err[0]

    assert _embed("--model", "vit_b", "--checkpoint", str(checkpoint), "--no-cache",
                  "--out", str(tmp_path / "o"), str(images[0])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vit_b" in err[0]


def test_the_installed_command_has_help_and_reports_failure_by_exit_status(tmp_path: Path, checkpoint: Path) -> None:
    trimask = Path(sys.executable).parent / "trimask"
    command = [str(trimask)] if trimask.exists() else [sys.executable, "-m", "trimask.cli"]
    shown = subprocess.run([*command, "embed", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert shown.returncode == 0
    assert "--out" in shown.stdout and "exit status" in shown.stdout
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    failed = subprocess.run([*command, "embed", "--checkpoint", str(checkpoint), "--device", "cpu",
                             "--out", str(tmp_path / "o"), str(notes)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert failed.returncode != 0
    assert "notes.txt" in failed.stderr
