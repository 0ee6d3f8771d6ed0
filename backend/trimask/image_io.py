"""Reading image files into the RGB pixels SAM sees, and what we say about a file without decoding it.

Every image that reaches a model goes through :func:`load_image`, so every
path agrees on orientation and colour:

- formats: JPEG (and MPO, which phones write), PNG, TIFF, WebP, BMP;
- EXIF orientation is applied (the pixels come out the way a viewer shows them);
- colour: grayscale (``1``, ``L``), palette (``P``), ``LA``/``PA``/``RGBA``, ``CMYK``,
  ``YCbCr`` and others become RGB. Transparent images are composited over
  **white**: fully transparent pixels often hold arbitrary colour (black or
  leftovers) that no viewer shows, and browsers draw the file over a light page;
- 16-bit (``I;16*``) samples are scaled to 8 bits (``round(v / 257)``, so
  65535 -> 255); 32-bit integer (``I``) samples are read as 16-bit when they
  fit in 0..65535, else stretched from their min..max; float (``F``) samples
  in 0..1 are scaled by 255, else stretched from their min..max;
- a decompression-bomb limit on width x height (:data:`MAX_IMAGE_PIXELS`,
  overridable by the ``TRIMASK_MAX_IMAGE_PIXELS`` environment variable or a
  ``max_pixels`` argument);
- a missing, unreadable, truncated, unsupported or non-image file raises
  :class:`~trimask.errors.TrimaskError` naming the file, never another exception.
"""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from trimask.errors import TrimaskError

StrPath = Union[str, "os.PathLike[str]"]

# Lower-case suffixes of the files a folder of images is scanned for.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".webp", ".bmp")

# PIL format names we decode (JPEG covers MPO, which phones write); anything
# else PIL could open is refused, which keeps an annotation server's attack
# surface small.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "WEBP", "BMP")

# Width x height above which a file is refused without decoding it: PIL's own
# error threshold (2 x 89.5 MP), large enough for any camera or scanner page.
MAX_IMAGE_PIXELS: int = 178_956_970

# EXIF orientations 5..8 rotate by 90 degrees, so width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

_HASH_CHUNK = 1 << 20


def max_image_pixels() -> int:
    """The pixel limit in force: ``TRIMASK_MAX_IMAGE_PIXELS`` if set, else :data:`MAX_IMAGE_PIXELS`."""
    env = os.environ.get("TRIMASK_MAX_IMAGE_PIXELS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise TrimaskError(f"TRIMASK_MAX_IMAGE_PIXELS must be an integer, not {env!r}.") from None
        if value <= 0:
            raise TrimaskError("TRIMASK_MAX_IMAGE_PIXELS must be a positive integer.")
        return value
    return MAX_IMAGE_PIXELS


def is_image_file(path: StrPath) -> bool:
    """True when the path's suffix is one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only) after checking it exists and its size is within ``max_pixels``."""
    if not path.exists():
        raise TrimaskError(f"Image file not found: {path}.")
    if path.is_dir():
        raise TrimaskError(f"Expected an image file but {path} is a folder.")
    # PIL refuses images above 2 x its own limit before we can look; lift its
    # limit (monotonically, process-wide) when ours is larger so ours decides.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        raise TrimaskError(
            f"{path} is too large to open safely (more than {max_pixels} pixels); "
            "raise TRIMASK_MAX_IMAGE_PIXELS if you trust it."
        ) from None
    except Image.UnidentifiedImageError:
        raise TrimaskError(
            f"{path} is not a supported image (JPEG, PNG, TIFF, WebP or BMP) or is damaged."
        ) from None
    except PermissionError:
        raise TrimaskError(f"No permission to read the image file {path}.") from None
    except Exception as exc:  # PIL plugins raise many types on bad headers
        raise TrimaskError(f"Could not read the image file {path}: {_reason(exc)}.") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise TrimaskError(
            f"{path} is too large to open safely ({width}x{height} = {width * height} pixels, "
            f"limit {max_pixels}); raise TRIMASK_MAX_IMAGE_PIXELS if you trust it."
        )
    if width <= 0 or height <= 0:
        image.close()
        raise TrimaskError(f"{path} has no pixels ({width}x{height}).")
    return image


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text.splitlines()[0]


def load_image(path: StrPath, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file into RGB pixels as a viewer shows them.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this (default: :func:`max_image_pixels`).

    Returns:
        ``np.uint8`` array, H x W x 3, C-contiguous, RGB, EXIF orientation applied.

    Raises:
        TrimaskError: naming the file, when it is missing, not an image, unsupported,
            truncated or damaged, or larger than the pixel limit.
    """
    path = Path(path)
    limit = max_image_pixels() if max_pixels is None else max_pixels
    image = _open(path, limit)
    try:
        with image:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            rgb = to_rgb(oriented if oriented is not None else image)
    except TrimaskError:
        raise
    except MemoryError:
        raise TrimaskError(f"Not enough memory to decode {path}.") from None
    except Exception as exc:  # truncated data surfaces as OSError, others as ValueError/SyntaxError/...
        raise TrimaskError(f"Could not decode the image file {path} (truncated or damaged?): {_reason(exc)}.") from exc
    return np.ascontiguousarray(rgb)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to ``np.uint8`` H x W x 3 RGB (see the module docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _high_depth_to_uint8(np.asarray(image), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    # Alpha channels, and palette / gray / RGB images with a transparent colour (PNG tRNS).
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_over_white(image.convert("RGBA"))
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    # 1, L, P, CMYK, YCbCr, LAB, HSV, ...: PIL knows these conversions.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _composite_over_white(rgba: Image.Image) -> np.ndarray:
    """RGBA -> RGB over a white background, rounded: out = c * a + 255 * (1 - a)."""
    pixels = np.asarray(rgba, dtype=np.uint16)
    color, alpha = pixels[:, :, :3], pixels[:, :, 3:4]
    # Integer arithmetic with rounding: (c*a + 255*(255-a) + 127) // 255.
    out = (color * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _high_depth_to_uint8(samples: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel 16-bit, 32-bit integer or float samples (H x W) -> uint8 (H x W)."""
    if mode.startswith("I;16"):
        values = samples.astype(np.float64) / 257.0
    elif mode == "I":
        lo, hi = int(samples.min()), int(samples.max())
        if lo >= 0 and hi <= 65535:
            values = samples.astype(np.float64) / 257.0
        else:
            values = _stretch(samples, lo, hi)
    else:  # "F"
        finite = samples[np.isfinite(samples)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        clean = np.nan_to_num(samples.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
        values = clean * 255.0 if lo >= 0.0 and hi <= 1.0 else _stretch(clean, lo, hi)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _stretch(samples: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo..hi linearly to 0..255 (a constant image maps to 0)."""
    if hi <= lo:
        return np.zeros(samples.shape, dtype=np.float64)
    return (samples.astype(np.float64) - lo) * (255.0 / (hi - lo))


def image_size(path: StrPath, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of the image as :func:`load_image` returns it, read from the header only.

    The EXIF orientation is honoured (orientations 5-8 swap width and height).
    Pixels are not decoded. Raises TrimaskError like :func:`load_image` for a
    missing, non-image or oversized file (a truncated body is only found by decoding).
    """
    path = Path(path)
    limit = max_image_pixels() if max_pixels is None else max_pixels
    image = _open(path, limit)
    with image:
        width, height = image.size
        try:
            orientation = _exif_orientation(image, path)
        except Exception:  # a damaged EXIF block: load_image will then not rotate either
            orientation = 1
        # Newer Pillow already reports a TIFF's size after orientation (its
        # undecoded size is then in _tile_size); swap only when it has not.
        already_oriented = getattr(image, "_tile_size", image.size) != image.size
    if orientation in _TRANSPOSING_ORIENTATIONS and not already_oriented:
        return height, width
    return width, height


def _exif_orientation(image: Image.Image, path: Path) -> int:
    """The EXIF orientation tag (1 when absent), without decoding pixels."""
    if image.format == "PNG" and "exif" not in image.info:
        # PIL's PNG getexif() decodes the whole image to reach an eXIf chunk
        # after the pixel data; find that chunk by walking chunk headers instead.
        raw = _png_exif_chunk(path)
        if raw is None:
            return 1
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = image.getexif()
    value = exif.get(_EXIF_ORIENTATION_TAG, 1)
    return int(value) if isinstance(value, int) else 1


def _png_exif_chunk(path: Path) -> bytes | None:
    """The payload of a PNG's ``eXIf`` chunk, found by seeking over chunk bodies, or None."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                data = f.read(length)
                return data if len(data) == length else None
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # body + CRC


def content_hash(path: StrPath) -> str:
    """SHA-256 of the file's bytes as 64 lower-case hex digits, read in 1 MiB chunks.

    Raises TrimaskError naming the file when it cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise TrimaskError(f"Image file not found: {path}.") from None
    except IsADirectoryError:
        raise TrimaskError(f"Expected an image file but {path} is a folder.") from None
    except OSError as exc:
        raise TrimaskError(f"Could not read {path}: {_reason(exc)}.") from exc
    return digest.hexdigest()
