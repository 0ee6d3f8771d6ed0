"""The official SAM and MobileSAM weight files: names, sizes, sha256 and where users download them.

Nothing here downloads anything; the table tells users what to fetch and lets ``trimask weights``
check what they have. Imports no torch, so ``trimask --help`` stays fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfficialWeights:
    """One official checkpoint file. sha256/size_bytes are None where not known for certain."""

    file_name: str
    model_type: str
    size_bytes: int | None
    sha256: str | None
    url: str
    description: str


OFFICIAL_WEIGHTS: tuple[OfficialWeights, ...] = (
    OfficialWeights(
        file_name="sam_vit_h_4b8939.pth",
        model_type="vit_h",
        size_bytes=2_564_550_879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        description="SAM ViT-H (Meta, Apache-2.0): best masks, slowest encoder",
    ),
    OfficialWeights(
        file_name="sam_vit_l_0b3195.pth",
        model_type="vit_l",
        size_bytes=1_249_524_607,
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        description="SAM ViT-L (Meta, Apache-2.0)",
    ),
    OfficialWeights(
        file_name="sam_vit_b_01ec64.pth",
        model_type="vit_b",
        size_bytes=375_042_383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        description="SAM ViT-B (Meta, Apache-2.0): the smallest official SAM",
    ),
    OfficialWeights(
        file_name="mobile_sam.pt",
        model_type="vit_t",
        size_bytes=40_728_226,
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        description="MobileSAM (TinyViT encoder + SAM decoder, Apache-2.0): fast on CPU",
    ),
)


def default_weights_dir() -> Path:
    """Where users keep weight files: $TRIMASK_WEIGHTS, else ~/.cache/trimask."""
    override = os.environ.get("TRIMASK_WEIGHTS")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "trimask"


def by_file_name(name: str) -> OfficialWeights | None:
    return next((w for w in OFFICIAL_WEIGHTS if w.file_name == name), None)


def by_model_type(model_type: str) -> OfficialWeights | None:
    return next((w for w in OFFICIAL_WEIGHTS if w.model_type == model_type), None)


def by_sha256(digest: str) -> OfficialWeights | None:
    return next((w for w in OFFICIAL_WEIGHTS if w.sha256 is not None and w.sha256 == digest.lower()), None)


def presence(entry: OfficialWeights, directory: Path) -> str:
    """'missing', 'present', or 'present, size differs' for entry's file in directory (no hashing)."""
    path = directory / entry.file_name
    if not path.is_file():
        return "missing"
    if entry.size_bytes is not None and path.stat().st_size != entry.size_bytes:
        return "present, size differs"
    return "present"
