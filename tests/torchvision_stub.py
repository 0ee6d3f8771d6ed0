"""A minimal stand-in for the torchvision imports of the official segment-anything.

torchvision cannot be installed here; segment-anything imports a few names
from it at import time. The parity tests only use the model modules and
``ResizeLongestSide.apply_image`` (which needs ``to_pil_image`` and
``resize`` on a PIL image: bilinear, as torchvision does for PIL input).
"""
from __future__ import annotations

import sys
import types

import numpy as np
from PIL import Image


def install() -> None:
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")

    def to_pil_image(array):
        return Image.fromarray(np.asarray(array))

    def resize(img, size, *args, **kwargs):
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def _unavailable(*args, **kwargs):
        raise NotImplementedError("torchvision is not available in tests")

    functional.to_pil_image = to_pil_image
    functional.resize = resize
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear")
    transforms.functional = functional
    transforms.Normalize = _unavailable
    boxes.batched_nms = _unavailable
    boxes.box_area = _unavailable
    ops.boxes = boxes
    ops.batched_nms = _unavailable
    tv.transforms = transforms
    tv.ops = ops
    sys.modules.update({
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
    })
