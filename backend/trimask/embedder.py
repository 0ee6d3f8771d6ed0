"""Image embeddings from a SAM image encoder, on GPU when there is one, cached on disk when asked.

This is the stateful "run the heavy encoder once per image" layer; the prompt
decoder runs elsewhere (in the browser, from the ONNX export).

Numerics by device:

- CPU: float32 throughout, with ``torch.set_num_threads`` set to every core
  this process may use (the encoder is compute-bound and one image at a time).
  The result equals the official implementation's within float32 rounding.
- CUDA: the encoder runs under ``torch.autocast`` in bfloat16 (float16 on GPUs
  without bfloat16). Autocast rather than casting the weights because it keeps
  layer norms, softmax and the residual stream in float32, which float16 needs
  to avoid overflow and which keeps agreement with float32 high
  (``bench/gpu_agreement.py`` measures it). Attention goes through
  ``scaled_dot_product_attention``, which picks PyTorch's fused kernels on CUDA.
  Images are preprocessed on the CPU exactly as officially (PIL resize), moved
  as uint8, normalized on the GPU and encoded in batches. Outputs are float32.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from trimask.embedding_cache import EmbeddingCache
from trimask.errors import TrimaskError
from trimask.image_io import content_hash, load_image
from trimask.models import build_sam, model_identity
from trimask.models.sam import Sam
from trimask.preprocess import normalize_and_pad, resize_longest_side

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Images per encoder call on CUDA: amortizes kernel launches without needing a
# large GPU (ViT-H in bf16 at batch 4 needs a few GiB of activations).
DEFAULT_CUDA_BATCH = 4


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" or "cuda:N" (TrimaskError when no GPU is usable)."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrimaskError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto.")
        resolved = torch.device(name)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TrimaskError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
        return resolved
    raise TrimaskError(f"Unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}.")


def choose_compute_dtype(device: torch.device, *, bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype the encoder computes in on ``device``.

    CPU: float32 (CPU autocast is slower than float32 on most CPUs and less exact).
    CUDA: bfloat16 when the GPU supports it (Ampere and newer), else float16.
    ``bf16_supported`` overrides the query of the current GPU (for tests and tools).
    """
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        with torch.cuda.device(device):
            bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype) -> ContextManager[object]:
    """Autocast to ``dtype`` on ``device``, or nothing when computing in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class Embedder:
    """A SAM image encoder ready to embed images.

    Args:
        model_type: one of ``trimask.models.MODEL_TYPES``.
        checkpoint: weights file (None: the bundled weights for ``tiny``, seeded random
            weights for the official types, as ``build_sam``).
        device: "auto", "cpu", "cuda" or "cuda:N".
        cache: where to keep embeddings between runs (used by :meth:`embed_path`).
        random_init: seeded random weights even for ``tiny`` (tests and benchmarks).
        dtype: force the compute dtype (default :func:`choose_compute_dtype`); float16 or
            bfloat16 on CPU runs the CPU autocast path (tests use it).
        batch_size: images per encoder call in :meth:`embed_batch` (default 4 on CUDA, 1 on CPU).
        num_threads: torch CPU threads (default: every available core); ignored on CUDA.
        sam: an already built model to use instead of building one (its identity is then
            computed from ``model_type``/``checkpoint`` as usual, so pass the matching ones).

    Attributes:
        identity: the model identity that keys the cache, e.g. ``vit_b-0123456789abcdef``.
        device: the torch device the encoder runs on.
        dtype: the dtype the encoder computes in.
        sam: the model (on ``device``; weights stay float32).
    """

    def __init__(
        self,
        model_type: str,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "auto",
        cache: EmbeddingCache | None = None,
        *,
        random_init: bool = False,
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        num_threads: int | None = None,
        sam: Sam | None = None,
    ) -> None:
        self.model_type = model_type
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.device = resolve_device(device)
        self.dtype = dtype if dtype is not None else choose_compute_dtype(self.device)
        self.cache = cache
        if batch_size is None:
            batch_size = DEFAULT_CUDA_BATCH if self.device.type == "cuda" else 1
        self.batch_size = batch_size
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.device.type == "cpu":
            # Global to the process, but so is the point of this object: encode as fast as the CPU allows.
            torch.set_num_threads(num_threads or available_cores())
        if random_init and checkpoint is not None:
            raise ValueError("random_init and checkpoint exclude each other")
        if random_init:
            self.identity = f"{model_type}-random"
        else:
            self.identity = model_identity(model_type, self.checkpoint)
        if sam is None:
            sam = build_sam(model_type, self.checkpoint, random_init=random_init)
        self.sam = sam.eval().to(self.device)

    def __repr__(self) -> str:
        return f"Embedder({self.identity!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # ------------------------------------------------------------------ encoding
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x 1024 x 1024 float32 (normalized, padded, on device) -> B x 256 x 64 x 64 float32."""
        with torch.inference_mode(), autocast_context(self.device, self.dtype):
            out = self.sam.image_encoder(images)
        return out.float()

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        """image: H x W x 3 uint8 RGB -> 1 x 3 x 1024 x 1024 float32 on device.

        The resize happens on the CPU with PIL (as the official pipeline does, so the
        numbers match); only uint8 pixels cross to the GPU, a quarter of float32's bytes.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {type(image).__name__} {shape}")
        resized = torch.from_numpy(np.array(resize_longest_side(image))).permute(2, 0, 1)[None]  # writable copy
        if self.device.type == "cuda":
            resized = resized.pin_memory().to(self.device, non_blocking=True)
        return normalize_and_pad(resized)

    def embed_image(self, image: np.ndarray) -> np.ndarray:
        """image: H x W x 3 uint8 RGB -> np.float32 ``[1, 256, 64, 64]`` (no cache involved)."""
        return self._encode(self._prepare(image)).cpu().numpy()

    def embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Several H x W x 3 uint8 RGB images (any sizes) -> np.float32 ``[B, 256, 64, 64]``.

        Runs the encoder on ``batch_size`` images per call.
        """
        if len(images) == 0:
            return np.zeros((0, 256, 64, 64), dtype=np.float32)
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.cat([self._prepare(image) for image in images[start : start + self.batch_size]])
            outputs.append(self._encode(chunk).cpu())
        return torch.cat(outputs).numpy()

    def embed_path(self, path: str | os.PathLike[str], *, image_hash: str | None = None) -> np.ndarray:
        """The embedding of an image file, np.float32 ``[1, 256, 64, 64]``.

        With a cache, the result is the cached float16 value (computed and stored
        first if missing), so every caller sees the same numbers as the browser.
        ``image_hash`` (the file's :func:`~trimask.image_io.content_hash`) saves
        hashing the file again when the caller already has it.
        Raises TrimaskError naming the file when it cannot be read as an image.
        """
        if self.cache is None:
            return self.embed_image(load_image(path))
        if image_hash is None:
            image_hash = content_hash(path)
        stored = self.cache.get_or_compute(image_hash, self.identity, lambda: self.embed_image(load_image(path)))
        return stored.astype(np.float32)

    def embed_files(self, paths: Sequence[str | os.PathLike[str]]) -> list[np.ndarray | TrimaskError]:
        """Embeddings of several files, batching the ones not cached yet.

        Returns, per path in order, np.float32 ``[1, 256, 64, 64]`` or the TrimaskError
        that says why that file could not be embedded (the others still are).
        Cached ones are read; the others are encoded ``batch_size`` at a time and stored.
        """
        results: list[np.ndarray | TrimaskError | None] = [None] * len(paths)
        todo: list[tuple[int, str | None, np.ndarray]] = []
        for i, path in enumerate(paths):
            try:
                image_hash = content_hash(path) if self.cache is not None else None
                cached = self.cache.get(image_hash, self.identity) if image_hash is not None else None
                if cached is not None:
                    results[i] = cached.astype(np.float32)
                    continue
                todo.append((i, image_hash, load_image(path)))
            except TrimaskError as exc:
                results[i] = exc
            if len(todo) == self.batch_size:
                self._embed_group(todo, results)
                todo = []
        if todo:
            self._embed_group(todo, results)
        return results  # type: ignore[return-value]

    def _embed_group(
        self, group: list[tuple[int, str | None, np.ndarray]], results: list[np.ndarray | TrimaskError | None]
    ) -> None:
        embeddings = self.embed_batch([image for _, _, image in group])
        for (i, image_hash, _), embedding in zip(group, embeddings):
            if self.cache is not None and image_hash is not None:
                # get_or_compute, not put: if another process stored it meanwhile, keep theirs.
                stored = self.cache.get_or_compute(image_hash, self.identity, lambda e=embedding: e[None])
                results[i] = stored.astype(np.float32)
            else:
                results[i] = embedding[None]
