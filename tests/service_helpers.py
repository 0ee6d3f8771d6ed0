"""Shared pieces of the service tests: image folders, a fake embedder, apps and real server processes."""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[1]
TRIMASK = [sys.executable, "-m", "trimask.cli"]


def write_image(path: Path, width: int, height: int, seed: int = 0, exif_orientation: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif.tobytes(), quality=95)
    else:
        image.save(path)
    return path


def make_images(folder: Path) -> Path:
    """Three images: a.png 40x30, b.jpg 24x16 in a sub-folder, c.png 8x8."""
    write_image(folder / "a.png", 40, 30, seed=1)
    write_image(folder / "sub" / "b.jpg", 24, 16, seed=2)
    write_image(folder / "c.png", 8, 8, seed=3)
    return folder


class FakeEmbedder:
    """Stands in for trimask.embedder.Embedder: a deterministic embedding per file, calls counted."""

    identity = "fake-0123456789abcdef"
    device = "cpu"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[Path] = []
        self._lock = threading.Lock()

    def embed_path(self, path: Path) -> np.ndarray:
        with self._lock:
            self.calls.append(Path(path))
        time.sleep(self.delay)
        seed = sum(Path(path).read_bytes()[:64]) % 1000
        return np.random.default_rng(seed).standard_normal((1, 256, 64, 64)).astype(np.float32)


def make_app(tmp_path: Path, **config: Any):
    from trimask.service.app import create_app

    images = tmp_path / "images"
    if not images.exists():
        make_images(images)
    decoder = tmp_path / "decoder.onnx"
    if not decoder.exists():
        decoder.write_bytes(b"fake onnx bytes")
    base = {
        "IMAGES_DIR": images,
        "ANNOTATIONS_DIR": tmp_path / "annotations",
        "EMBEDDER": FakeEmbedder(),
        "DECODER_FILE": decoder,
        "FRONTEND_DIST": tmp_path / "no-dist",
        "ORT_DIR": tmp_path / "no-ort",
        "PRECOMPUTE": False,
    }
    base.update(config)
    return create_app(base)


def rle_of(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def box_mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def annotation_body(mask: np.ndarray, category_id: int, **extra: Any) -> dict[str, Any]:
    body = {
        "category_id": category_id,
        "segmentation": rle_of(mask),
        "score": 0.91,
        "level": "part",
        "prompt": {"points": [[3.5, 4.0]], "labels": [1], "box": None},
    }
    body.update(extra)
    return body


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weights tiny checkpoint (the bundled weights may not exist where tests run)."""
    import torch

    from trimask.models.build import build_sam

    path = tmp_path_factory.mktemp("tiny") / "tiny_random.pt"
    torch.save(build_sam("tiny", random_init=True).state_dict(), path)
    return path


# ------------------------------------------------------------------ real server processes


class ServerProcess:
    """``trimask serve`` in a subprocess on a free loopback port."""

    def __init__(self, images: Path, annotations: Path, checkpoint: Path, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*TRIMASK, "serve", "--images", str(images), "--annotations", str(annotations),
             "--checkpoint", str(checkpoint), "--port", "0", "--no-precompute", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )
        self.port = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 90.0) -> int:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
                continue
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.url_line = line
                return int(match.group(1))
        raise RuntimeError("server did not print its URL in time")

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
            ctype = response.getheader("Content-Type", "")
            return response.status, json.loads(raw) if "json" in ctype and raw else raw
        finally:
            conn.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    stop = kill
