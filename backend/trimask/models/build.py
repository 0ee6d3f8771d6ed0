"""Build SAM models by name and load checkpoints strictly.

``vit_h``/``vit_l``/``vit_b`` are the official SAM models, ``vit_t`` MobileSAM (TinyViT encoder,
SAM's decoder) and ``tiny`` this project's embedded default. Official files load unchanged
(raw state dicts); our own files may wrap the state dict as ``{"model": state_dict, ...}``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trimask.errors import TrimaskError
from trimask.models.image_encoder import GLOBAL_ATTN_INDEXES, ImageEncoderViT
from trimask.models.mask_decoder import MaskDecoder
from trimask.models.prompt_encoder import PromptEncoder
from trimask.models.sam import Sam
from trimask.models.transformer import TwoWayTransformer

MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t", "tiny")

# (embed_dim, depth, num_heads) of the official ViT encoders.
_VIT_SIZES = {
    "vit_h": (1280, 32, 16),
    "vit_l": (1024, 24, 16),
    "vit_b": (768, 12, 12),
}

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
IMAGE_EMBEDDING_SIZE = 64

BUNDLED_TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "tiny.pt"

# A random-init model is seeded so its identity ("<type>-random") names one set of weights.
_RANDOM_INIT_SEED = 0


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise TrimaskError(f"Unknown model {model_type!r}; choose one of {', '.join(MODEL_TYPES)}.")


def _image_encoder(model_type: str, encoder_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A freshly initialized image encoder: B x 3 x 1024 x 1024 -> B x 256 x 64 x 64."""
    if model_type in _VIT_SIZES:
        embed_dim, depth, num_heads = _VIT_SIZES[model_type]
        return ImageEncoderViT(
            img_size=IMAGE_SIZE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            out_chans=PROMPT_EMBED_DIM,
            window_size=14,
            global_attn_indexes=GLOBAL_ATTN_INDEXES[model_type],
        )
    if model_type == "vit_t":
        from trimask.models.tiny_vit import TinyViT

        return TinyViT()
    try:
        module = importlib.import_module("trimask.models.tiny_encoder")
    except ModuleNotFoundError as exc:
        if exc.name != "trimask.models.tiny_encoder":
            raise
        raise TrimaskError(
            "The 'tiny' model's encoder (trimask.models.tiny_encoder) is not available in this installation."
        ) from exc
    return module.TinyImageEncoder(**dict(encoder_kwargs or {}))


def construct_sam(model_type: str, *, encoder_kwargs: Mapping[str, Any] | None = None) -> Sam:
    """A SAM of the given type with freshly initialized (unseeded) weights, in eval mode."""
    _check_model_type(model_type)
    sam = Sam(
        image_encoder=_image_encoder(model_type, encoder_kwargs),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(IMAGE_EMBEDDING_SIZE, IMAGE_EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        image_size=IMAGE_SIZE,
    )
    return sam.eval()


_INIT_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_parameter_init() -> Iterator[None]:
    """Skip the default init of the standard layers while building a model whose every parameter
    is about to be overwritten by a strict load (it takes ~7 s for ViT-H otherwise).

    The patch is process-wide while it lasts (a fraction of a second); random-init builds in
    build_sam wait for it on the same lock.
    """
    classes = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.LayerNorm)
    with _INIT_PATCH_LOCK:
        saved = [(cls, cls.__dict__["reset_parameters"]) for cls in classes]
        try:
            for cls, _ in saved:
                cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
            yield
        finally:
            for cls, method in saved:
                cls.reset_parameters = method  # type: ignore[method-assign]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file -> (state dict, extra entries of our wrapped format).

    Accepts a raw state dict (the official files) or ``{"model": state_dict, ...}`` (ours).
    Raises TrimaskError naming the file when it is missing, not a file, or not a readable checkpoint.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TrimaskError(f"Checkpoint file not found: {path}.")
    if not path.is_file():
        raise TrimaskError(f"Checkpoint path is not a file: {path}.")
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (RuntimeError, UnpicklingError, EOFError...)
        raise TrimaskError(
            f"Could not read checkpoint {path}: the file is truncated, corrupt, or not a PyTorch checkpoint "
            f"({type(exc).__name__})."
        ) from exc
    extra: dict[str, Any] = {}
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        extra = {k: v for k, v in loaded.items() if k != "model"}
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TrimaskError(f"Checkpoint {path} does not hold a model state dict.")
    return dict(loaded), extra


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def guess_model_type(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The model type whose state-dict keys and shapes the given one matches exactly, or None."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for model_type in MODEL_TYPES:
        try:
            with torch.device("meta"):
                reference = construct_sam(model_type)
        except TrimaskError:
            continue  # e.g. tiny's encoder not available
        if _shapes(reference) == shapes:
            return model_type
    return None


def _mismatch_summary(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    expected = _shapes(model)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    return ", ".join(parts) or "no key differences"


def load_checkpoint_into(sam: Sam, model_type: str, path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load state_dict into sam; on mismatch raise TrimaskError naming both types when known."""
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        looks_like = guess_model_type(state_dict)
        if looks_like is not None and looks_like != model_type:
            raise TrimaskError(
                f"Checkpoint {path} does not fit model {model_type}: it looks like a {looks_like} checkpoint "
                f"(use --model {looks_like})."
            ) from exc
        raise TrimaskError(
            f"Checkpoint {path} does not fit model {model_type}: {_mismatch_summary(sam, state_dict)}."
        ) from exc


def build_sam(model_type: str, checkpoint: str | Path | None = None, *, random_init: bool = False) -> Sam:
    """Build a SAM in eval mode on CPU, fp32 (see ``build_sam_and_extra``)."""
    return build_sam_and_extra(model_type, checkpoint, random_init=random_init)[0]


def build_sam_and_extra(
    model_type: str, checkpoint: str | Path | None = None, *, random_init: bool = False
) -> tuple[Sam, dict[str, Any]]:
    """Build a SAM in eval mode on CPU, fp32, with the extra entries of the checkpoint it was read from.

    Official types (vit_h, vit_l, vit_b, vit_t): checkpoint None gives a deterministic random
    init in the official layout; a checkpoint is loaded strictly (TrimaskError naming the model
    type, and the type the file looks like, when it does not fit).
    ``tiny``: checkpoint None loads the bundled weights (TrimaskError if missing).
    random_init=True always gives the deterministic random init and reads no file.
    Our own checkpoints may be ``{"model": state_dict, "encoder_kwargs": {...}}``; for ``tiny``
    the encoder_kwargs are passed to TinyImageEncoder. The extra entries are ``{}`` for a random init.
    """
    _check_model_type(model_type)
    if checkpoint is None and model_type == "tiny" and not random_init:
        if not BUNDLED_TINY_CHECKPOINT.is_file():
            raise TrimaskError(f"The bundled tiny model weights are missing: {BUNDLED_TINY_CHECKPOINT}.")
        checkpoint = BUNDLED_TINY_CHECKPOINT
    if checkpoint is None or random_init:
        # The lock keeps a concurrent _without_parameter_init from skipping this model's init.
        with _INIT_PATCH_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            return construct_sam(model_type), {}
    state_dict, extra = read_checkpoint(checkpoint)
    encoder_kwargs = extra.get("encoder_kwargs") if model_type == "tiny" else None
    with _without_parameter_init():
        sam = construct_sam(model_type, encoder_kwargs=encoder_kwargs)
    load_checkpoint_into(sam, model_type, checkpoint, state_dict)
    return sam, extra


# --- identity -------------------------------------------------------------------------------

_HASH_CHUNK = 1 << 22
_memory_hashes: dict[tuple[str, int, int], str] = {}


def _hash_cache_file() -> Path:
    """Where file hashes persist between runs (a 2.5 GB ViT-H file takes seconds to hash)."""
    override = os.environ.get("TRIMASK_HASH_CACHE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "trimask" / "checkpoint-hashes.json"


def sha256_file(path: str | Path, progress: Callable[[int], None] | None = None) -> str:
    """sha256 hex digest of a file's bytes; progress(n_bytes) is called per chunk when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, cached by (absolute path, mtime, size) in memory and on disk."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise TrimaskError(f"Checkpoint file not found: {path}.") from exc
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _memory_hashes:
        return _memory_hashes[key]
    cache_file = _hash_cache_file()
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    try:
        table = json.loads(cache_file.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    digest = table.get(disk_key)
    if not isinstance(digest, str):
        digest = sha256_file(path)
        table[disk_key] = digest
        with contextlib.suppress(OSError):  # the cache is an optimization; never fail for it
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".hashes-")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f)
            os.replace(tmp, cache_file)
    _memory_hashes[key] = digest
    return digest


def model_identity(model_type: str, checkpoint: str | Path | None = None) -> str:
    """A stable name for a model's weights, e.g. ``vit_b-0123456789abcdef`` (first 16 hex of the
    checkpoint's sha256). Random-init official models are ``<type>-random``; ``tiny`` without a
    checkpoint names the bundled file's hash."""
    _check_model_type(model_type)
    if checkpoint is None and model_type == "tiny":
        checkpoint = BUNDLED_TINY_CHECKPOINT
    if checkpoint is None:
        return f"{model_type}-random"
    return f"{model_type}-{checkpoint_sha256(checkpoint)[:16]}"
