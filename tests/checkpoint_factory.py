"""Official-format checkpoints from random weights, for parity and loading tests.

The reference models come from the official packages (``segment_anything`` for vit_b/l/h,
MobileSAM's ``mobile_sam`` for vit_t), so the keys are the official ones. Every parameter and
persistent buffer is perturbed: the official init leaves position terms (pos_embed, rel_pos,
attention biases) at zero and norms at identity, which would hide bugs in code using them.

Usage: ``make_official_checkpoint("vit_b", tmp_path / "vit_b.pth")`` -> the path;
``reference_model("vit_b", path)`` -> the official model with those weights, in eval mode.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import torchvision_stub  # noqa: E402

torchvision_stub.install()

OFFICIAL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t")


def _install_timm_stub() -> None:
    """MobileSAM's tiny_vit_sam imports a few names from timm, which needs torchvision; give it
    inference-equivalent stand-ins (drop path is the identity at rate 0 and in eval)."""
    if "timm" in sys.modules:
        return
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    models.layers = layers
    models.registry = registry
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def mobile_sam_available() -> bool:
    """Whether MobileSAM's reference package (PyPI: mobilesam-mirror) is installed."""
    _install_timm_stub()
    try:
        import mobile_sam  # noqa: F401
    except ImportError:
        return False
    return True


def official_registry(model_type: str):
    """The official builder for a model type (a function checkpoint=None -> Sam)."""
    if model_type == "vit_t":
        _install_timm_stub()
        from mobile_sam import sam_model_registry
    else:
        from segment_anything import sam_model_registry
    return sam_model_registry[model_type]


def official_skeleton(model_type: str) -> nn.Module:
    """The official model without allocating weights where possible (meta device), for key/shape checks.

    MobileSAM's constructor calls .item(), which meta tensors refuse; it is small, so it is built on CPU.
    """
    if model_type == "vit_t":
        return official_registry(model_type)()
    with torch.device("meta"):
        return official_registry(model_type)()


def perturbed_state_dict(model: nn.Module, *, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """The model's state dict with Gaussian noise added to every floating tensor.

    Tensors that are all zero at init get larger noise (0.1) so their terms matter; BatchNorm
    running variances stay positive.
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if value.is_floating_point():
            scale = 0.1 if not value.any() else std
            noise = torch.randn(value.shape, generator=generator) * scale
            value = value + noise
            if key.endswith("running_var"):
                value = value.abs() + 0.5
        elif key.endswith("num_batches_tracked"):
            value = value + 1
        out[key] = value.contiguous()
    return out


def make_official_checkpoint(model_type: str, path: str | Path, *, seed: int = 0, std: float = 0.02) -> Path:
    """Write a raw official-format state dict with perturbed random weights to path; return path."""
    if model_type not in OFFICIAL_TYPES:
        raise ValueError(f"not an official model type: {model_type}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = official_registry(model_type)()
    state_dict = perturbed_state_dict(model, seed=seed, std=std)
    path = Path(path)
    torch.save(state_dict, path)
    return path


def reference_model(model_type: str, checkpoint: str | Path) -> nn.Module:
    """The official implementation with the checkpoint's weights, fp32, eval mode."""
    model = official_registry(model_type)()
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    # MobileSAM caches its attention biases when eval() is called: refresh after loading,
    # as MobileSAM's own usage (load, then .eval()) does.
    return model.eval()


def make_shape_only_checkpoint(model_type: str, path: str | Path) -> Path:
    """Write the official keys and shapes of a model type with constant stride-0 tensors.

    The file is a few hundred KB even for ViT-H (each tensor stores one element), which is
    enough for tests about keys and shapes (type detection, mismatch errors), not for numerics.
    """
    model = official_skeleton(model_type)
    state_dict = {}
    for key, value in model.state_dict().items():
        one = torch.ones(1, dtype=value.dtype)
        state_dict[key] = one.expand(value.shape) if value.dim() else one.reshape(())
    path = Path(path)
    torch.save(state_dict, path)
    return path
