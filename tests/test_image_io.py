"""Image loading: formats, orientation, colour modes, limits and bad files."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trimask.errors import TrimaskError
from trimask.image_io import (
    IMAGE_EXTENSIONS,
    content_hash,
    image_size,
    is_image_file,
    load_image,
)


def _gradient_rgb(width: int = 40, height: int = 24) -> np.ndarray:
    """H x W x 3 uint8 with distinct rows, columns and channels, so flips and rotations show."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 10 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def _with_orientation(image: Image.Image, orientation: int) -> Image.Exif:
    exif = image.getexif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(
    "suffix,options",
    [
        (".png", {}),
        (".bmp", {}),
        (".tiff", {}),
        (".webp", {"lossless": True}),
    ],
)
def test_lossless_formats_round_trip_exact_rgb_pixels(tmp_path: Path, suffix: str, options: dict) -> None:
    pixels = _gradient_rgb()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(pixels).save(path, **options)
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (24, 40, 3) and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, pixels)


def test_jpeg_loads_as_rgb_close_to_the_source(tmp_path: Path) -> None:
    pixels = _gradient_rgb()
    path = tmp_path / "img.jpg"
    Image.fromarray(pixels).save(path, quality=98)
    loaded = load_image(path)
    assert loaded.shape == (24, 40, 3)
    assert np.abs(loaded.astype(int) - pixels.astype(int)).mean() < 4


@pytest.mark.parametrize(
    "orientation,transform",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1, :]),
        (5, lambda a: a.transpose(1, 0, 2)),
        (6, lambda a: np.rot90(a, -1)),
        (7, lambda a: np.rot90(a, 2).transpose(1, 0, 2)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tiff", ".webp"])
def test_exif_orientation_is_applied_and_reported_by_image_size(
    tmp_path: Path, suffix: str, orientation: int, transform
) -> None:
    pixels = _gradient_rgb()
    image = Image.fromarray(pixels)
    path = tmp_path / f"o{orientation}{suffix}"
    options = {"quality": 98} if suffix == ".jpg" else {"lossless": True} if suffix == ".webp" else {}
    image.save(path, exif=_with_orientation(image, orientation), **options)
    expected = np.ascontiguousarray(transform(pixels))
    loaded = load_image(path)
    assert loaded.shape == expected.shape
    assert np.abs(loaded.astype(int) - expected.astype(int)).mean() < 4
    assert image_size(path) == (expected.shape[1], expected.shape[0])


def test_image_size_finds_a_png_exif_chunk_written_after_the_pixels(tmp_path: Path) -> None:
    pixels = _gradient_rgb()
    plain = tmp_path / "plain.png"
    Image.fromarray(pixels).save(plain)
    data = plain.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()
    import struct
    import zlib

    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    iend = data.rindex(b"IEND") - 4
    late = tmp_path / "late.png"
    late.write_bytes(data[:iend] + chunk + data[iend:])
    assert image_size(late) == (24, 40)
    assert load_image(late).shape == (40, 24, 3)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = _gradient_rgb()[:, :, 0]
    path = tmp_path / "g.png"
    Image.fromarray(gray, mode="L").save(path)
    loaded = load_image(path)
    for c in range(3):
        np.testing.assert_array_equal(loaded[:, :, c], gray)


def test_one_bit_image_becomes_black_and_white(tmp_path: Path) -> None:
    bits = np.zeros((8, 8), dtype=bool)
    bits[2:5, 3:6] = True
    path = tmp_path / "b.png"
    Image.fromarray(bits).save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded[:, :, 1], np.where(bits, 255, 0))


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 0, 255)  # opaque: unchanged
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white, whatever the hidden colour
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white: mid gray
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    loaded = load_image(path)
    assert tuple(loaded[0, 0]) == (200, 100, 0)
    assert tuple(loaded[0, 1]) == (255, 255, 255)
    assert tuple(loaded[0, 2]) == (127, 127, 127)


def test_gray_with_alpha_and_transparent_palette_are_composited_over_white(tmp_path: Path) -> None:
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[0, 0] = (50, 255)
    la[0, 1] = (50, 0)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert tuple(loaded[0, 0]) == (50, 50, 50) and tuple(loaded[0, 1]) == (255, 255, 255)

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=1)
    loaded = load_image(tmp_path / "p.png")
    assert tuple(loaded[0, 0]) == (255, 0, 0) and tuple(loaded[0, 1]) == (255, 255, 255)


def test_rgb_png_with_a_transparent_colour_key_shows_white_there(tmp_path: Path) -> None:
    pixels = np.zeros((1, 2, 3), dtype=np.uint8)
    pixels[0, 1] = (10, 200, 30)
    Image.fromarray(pixels).save(tmp_path / "key.png", transparency=(0, 0, 0))
    loaded = load_image(tmp_path / "key.png")
    assert tuple(loaded[0, 0]) == (255, 255, 255) and tuple(loaded[0, 1]) == (10, 200, 30)


def test_opaque_palette_image_keeps_its_colours(tmp_path: Path) -> None:
    pixels = _gradient_rgb()
    Image.fromarray(pixels).quantize(16).save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), expected)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    samples = np.array([[0, 257, 32896, 65535, 128]], dtype=np.uint16)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode.startswith("I;16")
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 1, 128, 255, 0])
    np.testing.assert_array_equal(loaded[:, :, 0], loaded[:, :, 2])


def test_thirty_two_bit_integer_samples_in_16_bit_range_are_scaled_as_16_bit(tmp_path: Path) -> None:
    samples = np.array([[0, 65535, 257 * 100]], dtype=np.int32)
    path = tmp_path / "i32.tiff"
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 255, 100])


def test_float_samples_in_unit_range_are_scaled_by_255(tmp_path: Path) -> None:
    samples = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = tmp_path / "f.tiff"
    Image.fromarray(samples).save(path)
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 128, 255])


def test_cmyk_jpeg_and_tiff_become_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg", quality=100)
    cmyk.save(tmp_path / "c.tiff")
    for name in ("c.jpg", "c.tiff"):
        loaded = load_image(tmp_path / name)
        assert loaded.shape == (4, 6, 3)
        red, green, blue = (int(v) for v in loaded[1, 1])
        assert red > 200 and green < 60 and blue < 60, (name, red, green, blue)


def test_missing_file_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    for call in (load_image, image_size, content_hash):
        with pytest.raises(TrimaskError, match="nope.jpg"):
            call(missing)


def test_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrimaskError, match="folder"):
        load_image(tmp_path)


def test_non_image_file_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(TrimaskError, match="notes.png"):
        load_image(path)
    with pytest.raises(TrimaskError, match="notes.png"):
        image_size(path)


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(TrimaskError, match="empty.jpg"):
        load_image(path)


def test_unsupported_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    Image.fromarray(_gradient_rgb()).save(path)
    with pytest.raises(TrimaskError, match="not a supported image"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tiff", ".bmp"])
def test_truncated_file_is_a_clear_error_naming_it(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # incompressible, so cutting loses pixels
    full = tmp_path / f"full{suffix}"
    Image.fromarray(noise).save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrimaskError, match=f"cut\\{suffix}"):
        load_image(cut)


def test_garbage_after_a_valid_header_is_a_clear_error(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(_gradient_rgb()).save(full)
    data = bytearray(full.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 40] = bytes(range(40))  # corrupt the compressed pixels
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(TrimaskError, match="bad.png"):
        load_image(bad)


def test_decompression_bomb_limit_refuses_large_images_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (100, 50)).save(path)
    with pytest.raises(TrimaskError, match="too large"):
        load_image(path, max_pixels=4999)
    with pytest.raises(TrimaskError, match="too large"):
        image_size(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).shape == (50, 100, 3)
    monkeypatch.setenv("TRIMASK_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(TrimaskError, match="big.png"):
        load_image(path)
    monkeypatch.setenv("TRIMASK_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(TrimaskError, match="TRIMASK_MAX_IMAGE_PIXELS"):
        load_image(path)


def test_content_hash_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 9000  # > 1 MiB, so several chunks are hashed
    path.write_bytes(data)
    assert content_hash(path) == hashlib.sha256(data).hexdigest()


def test_image_extensions_cover_the_supported_formats() -> None:
    for name in ("a.JPG", "b.jpeg", "c.png", "d.tif", "e.TIFF", "f.webp", "g.bmp"):
        assert is_image_file(name)
    assert not is_image_file("notes.txt")
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
