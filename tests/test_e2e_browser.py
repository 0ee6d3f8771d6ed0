"""End-to-end: `trimask serve` + the built frontend in headless Chromium (Playwright).

The page is driven only through design.md's automation hooks (data-testid
attributes, keys). Masks the browser saves are checked against the same
decoder run by Python's onnxruntime with SAM's postprocessing in torch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from trimask.edge_snap import snap
from trimask.training.evaluate import keep_clicked_regions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FRONTEND = REPO / "frontend"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 90_000
LEVEL_KEYS = {"subpart": "1", "part": "2", "whole": "3"}

playwright_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)


# ------------------------------------------------------------------ helpers


def http_json(base: str, path: str, method: str = "GET", body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def http_bytes(base: str, path: str) -> bytes:
    with urllib.request.urlopen(base + path, timeout=300) as r:
        return r.read()


def preprocess_shape(h: int, w: int, long_side: int = 1024) -> tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_postprocess(low_res: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """SAM's postprocess_masks for one [256, 256] logit map -> bool [H, W]."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(low_res, dtype=np.float32))[None, None]
    t = F.interpolate(t, (1024, 1024), mode="bilinear", align_corners=False)
    nh, nw = preprocess_shape(*hw)
    t = F.interpolate(t[..., :nh, :nw], hw, mode="bilinear", align_corners=False)
    return (t[0, 0] > 0).numpy()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def rle_to_mask(seg: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = seg["counts"]
    rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(rle, *seg["size"])
    return mask_utils.decode(rle).astype(bool)


class PythonDecoder:
    """The server's decoder.onnx in Python onnxruntime, fed the way the page feeds it."""

    def __init__(self, base: str, tmp: Path) -> None:
        import onnxruntime as ort

        path = tmp / "decoder.onnx"
        path.write_bytes(http_bytes(base, "/api/decoder.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.base = base
        self.embeddings: dict[int, np.ndarray] = {}
        # The page's "clicked regions" and "snap edges" defaults for the server's model (frontend/src/settings.ts).
        self.clicked_regions = self.snap_edges = http_json(base, "/api/status").get("model") == "tiny"
        self.pixels: dict[int, np.ndarray] = {}

    def image(self, image_id: int) -> np.ndarray:
        """The image's RGB pixels as the server serves them."""
        if image_id not in self.pixels:
            import io

            from PIL import Image

            raw = http_bytes(self.base, f"/api/images/{image_id}/file")
            self.pixels[image_id] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        return self.pixels[image_id]

    def embedding(self, image_id: int) -> np.ndarray:
        if image_id not in self.embeddings:
            raw = http_bytes(self.base, f"/api/images/{image_id}/embedding")
            self.embeddings[image_id] = np.frombuffer(raw, "<f2").astype(np.float32).reshape(1, 256, 64, 64)
        return self.embeddings[image_id]

    def run(self, image_id: int, hw: tuple[int, int], points, labels, box=None, mask_input=None) -> dict[str, np.ndarray]:
        h, w = hw
        nh, nw = preprocess_shape(h, w)
        sx, sy = nw / w, nh / h
        coords = [[x * sx, y * sy] for x, y in points]
        labs = [float(v) for v in labels]
        if box is not None:
            coords += [[box[0] * sx, box[1] * sy], [box[2] * sx, box[3] * sy]]
            labs += [2.0, 3.0]
        else:
            coords.append([0.0, 0.0])
            labs.append(-1.0)
        feeds = {
            "image_embeddings": self.embedding(image_id),
            "point_coords": np.asarray([coords], np.float32),
            "point_labels": np.asarray([labs], np.float32),
            "mask_input": (np.zeros((1, 1, 256, 256), np.float32) if mask_input is None
                           else mask_input.reshape(1, 1, 256, 256).astype(np.float32)),
            "has_mask_input": np.asarray([0.0 if mask_input is None else 1.0], np.float32),
            "orig_im_size": np.asarray([h, w], np.float32),
        }
        names = ["iou_predictions", "low_res_masks", "areas"]
        return dict(zip(names, self.session.run(names, feeds)))

    def masks(self, out: dict[str, np.ndarray], hw: tuple[int, int], points, labels, image_id: int | None = None,
              regions: bool | None = None, edges: bool | None = None) -> list[np.ndarray]:
        """The four tokens' masks as the page keeps them: SAM's postprocessing or, with the page's "snap
        edges" setting (and ``image_id``), snapped to the image's edges (trimask.edge_snap); then, with its
        "clicked regions" setting, only the regions that hold a positive click. ``regions`` / ``edges``
        override the page's defaults."""
        if (self.snap_edges if edges is None else edges) and image_id is not None:
            masks = [snap(out["low_res_masks"][0, t], self.image(image_id)) for t in range(4)]
        else:
            masks = [sam_postprocess(out["low_res_masks"][0, t], hw) for t in range(4)]
        positives = [pt for pt, lb in zip(points, labels) if lb == 1]
        if (self.clicked_regions if regions is None else regions) and positives:
            masks = [keep_clicked_regions(m, positives) for m in masks]
        return masks

    @staticmethod
    def token_for_level(out: dict[str, np.ndarray], level: str, masks: list[np.ndarray] | None = None) -> int:
        """The page's rule: tokens 1..3 sorted by area (of ``masks`` where given, as the page keeps them)
        are subpart, part, whole; token 0 is single."""
        if level == "single":
            return 0
        areas = out["areas"][0] if masks is None else [float(m.mean()) for m in masks]
        order = sorted([1, 2, 3], key=lambda t: (areas[t], t))
        return order[("subpart", "part", "whole").index(level)]


# ------------------------------------------------------------------ fixtures


def _frontend_stale() -> bool:
    index = FRONTEND / "dist" / "index.html"
    if not index.is_file():
        return True
    built = index.stat().st_mtime
    sources = [FRONTEND / n for n in ("index.html", "vite.config.ts", "tsconfig.json", "package-lock.json")]
    sources += list((FRONTEND / "src").rglob("*"))
    return any(p.is_file() and p.stat().st_mtime > built for p in sources)


@pytest.fixture(scope="session")
def frontend_dist() -> Path:
    """The built frontend; built here only when missing or older than its sources."""
    if _frontend_stale():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("the frontend is not built and npm is missing: run scripts/setup.sh")
        if not (FRONTEND / "node_modules").is_dir():
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=FRONTEND, check=True)
        subprocess.run([npm, "run", "build"], cwd=FRONTEND, check=True, stdout=subprocess.DEVNULL)
    return FRONTEND / "dist"


def _scene_image(size: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """A generated scene, a point deep inside its largest part (x, y) and that part's mask."""
    from scipy import ndimage

    from trimask.training.scenes import generate_scene

    scene = generate_scene(900_123, size=size)
    wholes, counts = np.unique(scene.whole_map[scene.whole_map > 0], return_counts=True)
    whole = wholes[np.argmax(counts)]
    parts, pcounts = np.unique(scene.part_map[scene.whole_map == whole], return_counts=True)
    part = parts[np.argmax(pcounts)]
    depth = ndimage.distance_transform_edt(scene.part_map == part)
    y, x = np.unravel_index(np.argmax(depth), depth.shape)
    return scene.image, (int(x), int(y)), scene.part_map == part


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, dict]:
    """Two images: a generated scene (square) and drawn shapes (640 x 400), with a point on an object each."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    out: dict[str, dict] = {}
    try:
        pixels, point, part = _scene_image(512)
        Image.fromarray(pixels).save(folder / "a_scene.png")
    except ImportError:
        im = Image.new("RGB", (512, 512), (70, 120, 170))
        ImageDraw.Draw(im).ellipse((100, 120, 400, 420), fill=(230, 180, 40))
        im.save(folder / "a_scene.png")
        point = (250, 270)
        part = None
    out["scene"] = {"file": "a_scene.png", "point": point, "part": part}
    im = Image.new("RGB", (640, 400), (40, 90, 40))
    d = ImageDraw.Draw(im)
    d.ellipse((80, 60, 300, 300), fill=(220, 60, 60))
    d.ellipse((150, 130, 220, 200), fill=(250, 240, 80))
    d.rectangle((380, 100, 600, 340), fill=(60, 80, 220))
    d.rectangle((420, 140, 500, 220), fill=(240, 240, 240))
    im.save(folder / "b_shapes.png")
    # regions_point: on the blue rectangle, where the bundled tiny model's subpart candidate, its edges not
    # snapped, also covers specks away from the click (3 regions, 2,204 pixels; the click's own 1,897).
    out["shapes"] = {"file": "b_shapes.png", "point": (250, 250), "box": (370, 90, 610, 350), "bg_point": (185, 165),
                     "regions_point": (580, 300)}
    out["_dir"] = {"path": folder}
    return out


def _trained_weights() -> bool:
    from trimask.models.build import BUNDLED_TINY_CHECKPOINT

    return Path(BUNDLED_TINY_CHECKPOINT).is_file()


TRAINED_WEIGHTS = _trained_weights()


def _model_args(tmp: Path) -> list[str]:
    """The embedded default model; random 'tiny' weights only while the trained file is not committed."""
    if TRAINED_WEIGHTS:
        return ["--model", "tiny"]
    import torch

    from trimask.models.build import build_sam

    ckpt = tmp / "tiny_random.pt"
    torch.save(build_sam("tiny", random_init=True).state_dict(), ckpt)
    return ["--model", "tiny", "--checkpoint", str(ckpt)]


@pytest.fixture(scope="module")
def server(frontend_dist, images, tmp_path_factory):
    """`trimask serve` on 127.0.0.1 with a free port; yields its base URL and image records."""
    tmp = tmp_path_factory.mktemp("server")
    trimask = Path(sys.executable).with_name("trimask")
    cmd = [str(trimask) if trimask.exists() else sys.executable, *([] if trimask.exists() else ["-m", "trimask.cli"]),
           "serve", "--images", str(images["_dir"]["path"]), "--annotations", str(tmp / "annotations"),
           "--host", "127.0.0.1", "--port", "0", *_model_args(tmp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = None
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
        if m:
            base = m.group(1)
            break
    if base is None:
        proc.kill()
        pytest.fail("trimask serve did not start:\n" + "".join(lines))
    # Keep draining the server's output so a full pipe never blocks it.
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    try:
        records = http_json(base, "/api/images")
        by_file = {r["file_name"]: r for r in records}
        yield {"base": base, "images": {k: by_file[v["file"]] for k, v in images.items() if "file" in v}, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def python_decoder(server) -> PythonDecoder:
    return PythonDecoder(server["base"], server["tmp"])


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Annotator:
    """A page on the annotator, driven through design.md's hooks, collecting console errors."""

    def __init__(self, page, server: dict) -> None:
        self.page = page
        self.base = server["base"]
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.set_default_timeout(TIMEOUT_MS)

    def open(self, image_id: int) -> None:
        self.page.goto(f"{self.base}/?image={image_id}")
        self.wait_ready(image_id)

    def wait_ready(self, image_id: int) -> None:
        self.page.wait_for_selector(f"[data-testid=stage][data-image-id='{image_id}'][data-ready=true]")

    def stage_box(self) -> dict:
        return self.page.locator("[data-testid=stage]").bounding_box()

    def client_xy(self, record: dict, x: float, y: float) -> tuple[float, float]:
        """Client coordinates of image pixel (x, y) at zoom 1 (design.md's stage contract)."""
        box = self.stage_box()
        return box["x"] + (x + 0.5) * box["width"] / record["width"], box["y"] + (y + 0.5) * box["height"] / record["height"]

    def click(self, record: dict, x: float, y: float, button: str = "left") -> None:
        cx, cy = self.client_xy(record, x, y)
        self.page.mouse.click(cx, cy, button=button)

    def wait_candidates(self, count: int) -> list[dict]:
        self.page.wait_for_function(
            f"document.querySelectorAll('[data-testid=candidate]').length === {count}"
            " && document.querySelector('[data-testid=candidate][aria-selected=true]') !== null"
        )
        return self.candidates()

    def candidates(self) -> list[dict]:
        return self.page.eval_on_selector_all(
            "[data-testid=candidate]",
            "els => els.map(e => ({level: e.dataset.level, iou: Number(e.dataset.iou),"
            " selected: e.getAttribute('aria-selected') === 'true'}))",
        )

    def objects(self) -> int:
        return self.page.locator("[data-testid=object]").count()

    def wait_objects(self, count: int) -> None:
        self.page.wait_for_function(f"document.querySelectorAll('[data-testid=object]').length === {count}")

    def server_annotations(self, image_id: int) -> list[dict]:
        return http_json(self.base, f"/api/images/{image_id}/annotations")

    def wait_server_count(self, image_id: int, count: int) -> list[dict]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            anns = self.server_annotations(image_id)
            if len(anns) == count:
                return anns
            time.sleep(0.1)
        raise AssertionError(f"expected {count} annotations on the server, found {len(anns)}")

    def start_on(self, record: dict) -> int:
        """Opens the image; returns how many objects the server has for it."""
        self.open(record["id"])
        return len(self.server_annotations(record["id"]))

    def open_with(self, record: dict, query: str) -> str:
        """Opens the image with page options (``query``, e.g. ``edges=off``); returns the status line once
        the decoder has written it."""
        self.page.goto(f"{self.base}/?image={record['id']}&{query}")
        self.wait_ready(record["id"])
        self.page.wait_for_function("document.querySelector('[data-testid=status]').textContent.includes('decoder:')")
        return self.page.inner_text("[data-testid=status]")

    def save_click(self, record: dict, x: float, y: float, level: str, count: int) -> dict:
        """Clicks (x, y), chooses ``level`` of the three candidates and saves it; returns the saved object
        once the server holds ``count``."""
        self.click(record, x, y)
        self.wait_candidates(3)
        self.page.keyboard.press(LEVEL_KEYS[level])
        return self.accept(record, count)

    def accept(self, record: dict, count: int) -> dict:
        """Enter, then waits until the server holds `count` objects; returns the newest."""
        self.page.keyboard.press("Enter")
        return self.wait_server_count(record["id"], count)[-1]

    def clear_and_settle(self) -> None:
        self.page.keyboard.press("Escape")
        self.page.wait_for_function("document.querySelectorAll('[data-testid=candidate]').length === 0")


@pytest.fixture
def annotator(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    a = Annotator(page, server)
    yield a
    context.close()


def assert_no_console_errors(a: Annotator) -> None:
    assert a.errors == [], f"console errors: {a.errors}"


def check_parity(decoder: PythonDecoder, record: dict, ann: dict, mask_input: np.ndarray | None = None,
                 edges: bool | None = None) -> dict:
    """The saved mask equals Python onnxruntime's output for the saved prompt (IoU >= 0.999), kept as the
    page keeps it (``edges``: whether the page snapped edges, when not its default)."""
    hw = (record["height"], record["width"])
    p = ann["prompt"]
    out = decoder.run(record["id"], hw, p["points"], p["labels"], p["box"], mask_input)
    masks = decoder.masks(out, hw, p["points"], p["labels"], record["id"], edges=edges)
    token = decoder.token_for_level(out, ann["level"], masks)
    expected = masks[token]
    got = rle_to_mask(ann["segmentation"])
    assert got.shape == hw
    assert iou(got, expected) >= 0.999, f"{ann['level']}: IoU {iou(got, expected):.5f}"
    # The predicted IoU is compared too, so the check holds even where a mask happens to be empty.
    assert ann["score"] == pytest.approx(float(out["iou_predictions"][0, token]), abs=2e-3)
    return {"out": out, "token": token}


# ------------------------------------------------------------------ tests


def test_click_shows_three_levels_and_each_saved_mask_equals_python_decoder(annotator, server, python_decoder, images):
    a = annotator
    record = server["images"]["scene"]
    x, y = images["scene"]["point"]
    a.open(record["id"])
    if "prepared" in http_json(server["base"], "/api/status").get("decoder_parts", []):
        # The first clicks then run the two-graph fast path, and parity below covers it.
        a.page.wait_for_function("document.querySelector('[data-testid=status]').textContent.includes('fast path')")
    before = len(a.server_annotations(record["id"]))
    for n, level in enumerate(("subpart", "part", "whole"), start=1):
        a.click(record, x, y)
        cands = a.wait_candidates(3)
        assert [c["level"] for c in cands] == ["subpart", "part", "whole"]
        assert sum(c["selected"] for c in cands) == 1
        best = max(cands, key=lambda c: c["iou"])
        assert best["selected"], "the candidate with the highest predicted IoU is preselected"
        if n == 1:
            shot = os.environ.get("TRIMASK_SCREENSHOT")
            a.page.screenshot(path=shot or str(server["tmp"] / "three_candidates.png"))
        a.page.keyboard.press(LEVEL_KEYS[level])
        chosen = [c for c in a.candidates() if c["selected"]]
        assert [c["level"] for c in chosen] == [level]
        a.page.keyboard.press("Enter")
        a.wait_objects(n)
        anns = a.wait_server_count(record["id"], before + n)
        saved = anns[-1]
        assert saved["level"] == level
        assert saved["score"] == pytest.approx(chosen[0]["iou"], abs=1e-3)
        check_parity(python_decoder, record, saved)
        assert a.page.locator("[data-testid=candidate]").count() == 0, "saving clears the candidates"
    assert_no_console_errors(a)


def _mask_layer_coverage(a) -> np.ndarray:
    """Which pixels of the mask layer (the hover preview, or the chosen candidate) are painted."""
    w, h, alpha = a.page.evaluate(
        "(() => { const c = document.getElementById('mask-layer'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; const a = [];"
        " for (let i = 3; i < d.length; i += 4) a.push(d[i] > 0 ? 1 : 0); return [c.width, c.height, a]; })()"
    )
    return np.array(alpha, dtype=np.uint8).reshape(h, w)


def test_hover_previews_follow_the_pointer_and_a_click_there_saves_the_python_mask(annotator, server, python_decoder, images):
    """With two threads two one-thread workers stand beside the main one (clicks on the one lately
    faster, a moving pointer's previews on the two one-thread ones side by side): the preview left
    showing is the last pointer position's (no stale decode queued, none arriving late, none older
    than the one showing). The preview (from the hover graph: one mask) is the mask the click
    there preselects, and clicking there shows all three candidates and saves the mask Python's
    decoder gives."""
    a = annotator
    record = server["images"]["shapes"]
    start = len(a.server_annotations(record["id"]))
    a.page.goto(f"{a.base}/?image={record['id']}&threads=2")
    a.wait_ready(record["id"])
    if a.page.evaluate("navigator.hardwareConcurrency < 2 || !self.crossOriginIsolated"):
        pytest.skip("one core (or no cross-origin isolation): no one-thread workers")
    a.page.wait_for_function("document.querySelector('[data-testid=status]').textContent.includes('2 × 1-thread worker')")
    assert "hover graph" in a.page.inner_text("[data-testid=status]")
    x, y = images["shapes"]["point"]
    for px, py in ((100, 100), (450, 200), (200, 300), (520, 320), (300, 120), (x, y)):
        a.page.mouse.move(*a.client_xy(record, px, py))
    a.page.wait_for_function(
        "(() => { const p = document.querySelector('[data-testid=stage]').dataset.hoverPoint;"
        f" if (!p) return false; const [hx, hy] = p.split(',').map(Number);"
        f" return Math.abs(hx - {x + 0.5}) < 0.6 && Math.abs(hy - {y + 0.5}) < 0.6; }})()"
    )
    previews = a.page.evaluate("window.__trimaskTimings.hover.length")
    a.page.wait_for_timeout(1000)  # any decode still running ends meanwhile, and must not replace it
    hx, hy = map(float, a.page.locator("[data-testid=stage]").get_attribute("data-hover-point").split(","))
    assert (hx, hy) == pytest.approx((x + 0.5, y + 0.5), abs=0.6)
    assert a.page.evaluate("window.__trimaskTimings.hover.length") == previews, "no preview after the last one"
    previewed = _mask_layer_coverage(a)
    a.click(record, x, y)
    cands = a.wait_candidates(3)
    best = max(cands, key=lambda c: c["iou"])
    chosen = _mask_layer_coverage(a)
    assert previewed.shape == chosen.shape and chosen.sum() > 0
    assert (previewed != chosen).sum() <= 2, "the preview is the click's preselected candidate"
    saved = a.accept(record, start + 1)
    assert saved["level"] == best["level"]
    check_parity(python_decoder, record, saved)
    assert_no_console_errors(a)


def test_saved_objects_survive_a_reload_and_are_in_the_coco_export(annotator, server, images):
    a = annotator
    record = server["images"]["scene"]
    start = a.start_on(record)
    a.wait_objects(start)
    x, y = images["scene"]["point"]
    a.click(record, x, y)
    a.wait_candidates(3)
    a.page.keyboard.press("Enter")
    anns = a.wait_server_count(record["id"], start + 1)
    a.page.reload()
    a.wait_ready(record["id"])
    a.wait_objects(start + 1)
    coco = http_json(server["base"], "/api/export/coco")
    exported = [x for x in coco["annotations"] if x["image_id"] == record["id"]]
    assert sorted(x["id"] for x in exported) == sorted(x["id"] for x in anns)
    for x in exported:
        assert x["area"] == int(rle_to_mask(x["segmentation"]).sum())
    assert_no_console_errors(a)


def test_undo_redo_of_prompt_points_and_of_a_saved_object(annotator, server, images):
    a = annotator
    record = server["images"]["shapes"]
    a.open(record["id"])
    a.clear_and_settle()
    start = len(a.server_annotations(record["id"]))
    shown = a.objects()
    x, y = images["shapes"]["point"]
    a.click(record, x, y)
    a.wait_candidates(3)
    a.click(record, 500, 300)  # a second foreground point: single-mask output
    assert [c["level"] for c in a.wait_candidates(1)] == ["single"]
    a.page.keyboard.press("Control+z")
    assert len(a.wait_candidates(3)) == 3
    a.page.keyboard.press("Control+Shift+z")
    assert [c["level"] for c in a.wait_candidates(1)] == ["single"]
    a.page.keyboard.press("Enter")
    a.wait_objects(shown + 1)
    a.wait_server_count(record["id"], start + 1)
    a.page.keyboard.press("Control+z")  # undo the save: the object goes, its prompt comes back
    a.wait_objects(shown)
    a.wait_server_count(record["id"], start)
    a.wait_candidates(1)
    a.page.keyboard.press("Control+Shift+z")  # redo: saved again
    a.wait_objects(shown + 1)
    anns = a.wait_server_count(record["id"], start + 1)
    assert anns[-1]["prompt"]["labels"] == [1, 1]
    a.page.keyboard.press("Escape")
    assert_no_console_errors(a)


def test_box_prompt_saves_the_single_mask_python_gives(annotator, server, python_decoder, images):
    a = annotator
    record = server["images"]["shapes"]
    start = a.start_on(record)
    x0, y0, x1, y1 = images["shapes"]["box"]
    c0 = a.client_xy(record, x0, y0)
    c1 = a.client_xy(record, x1, y1)
    a.page.mouse.move(*c0)
    a.page.mouse.down()
    a.page.mouse.move((c0[0] + c1[0]) / 2, (c0[1] + c1[1]) / 2, steps=4)
    a.page.mouse.move(*c1, steps=4)
    a.page.mouse.up()
    assert [c["level"] for c in a.wait_candidates(1)] == ["single"]
    saved = a.accept(record, start + 1)
    assert saved["prompt"]["points"] == []
    bx = saved["prompt"]["box"]
    assert bx[0] == pytest.approx(x0 + 0.5, abs=1.5) and bx[3] == pytest.approx(y1 + 0.5, abs=1.5)
    check_parity(python_decoder, record, saved)
    assert_no_console_errors(a)


def test_background_click_refines_the_chosen_candidate_like_python(annotator, server, python_decoder, images):
    a = annotator
    record = server["images"]["shapes"]
    start = a.start_on(record)
    x, y = images["shapes"]["point"]
    a.click(record, x, y)
    a.wait_candidates(3)
    a.page.keyboard.press("3")
    bx, by = images["shapes"]["bg_point"]
    a.click(record, bx, by, button="right")
    assert [c["level"] for c in a.wait_candidates(1)] == ["single"]
    saved = a.accept(record, start + 1)
    assert saved["prompt"]["labels"] == [1, 0]
    # Python replays the session: first click -> "whole" token's logits -> mask_input of the refinement.
    hw = (record["height"], record["width"])
    first = python_decoder.run(record["id"], hw, saved["prompt"]["points"][:1], [1])
    first_masks = python_decoder.masks(first, hw, saved["prompt"]["points"][:1], [1], record["id"])
    token = python_decoder.token_for_level(first, "whole", first_masks)
    check_parity(python_decoder, record, saved, mask_input=first["low_res_masks"][0, token])
    assert_no_console_errors(a)


@pytest.mark.skipif(not TRAINED_WEIGHTS, reason="needs the bundled tiny weights")
def test_clicked_regions_cut_an_answer_to_the_clicked_region_unless_the_url_says_all(annotator, server, python_decoder, images):
    """With the embedded tiny model the page keeps only the regions of an answer that hold a positive
    click ("clicked regions", its default for tiny): the subpart candidate at this point is saved without
    the specks it also covers. With ?regions=all the decoder's mask is saved whole. Both as Python gives.
    (Edges not snapped, ?edges=off: snapped, this answer has no specks.)"""
    a = annotator
    record = server["images"]["shapes"]
    hw = (record["height"], record["width"])
    x, y = images["shapes"]["regions_point"]
    start = len(a.server_annotations(record["id"]))
    assert "clicked regions" in a.open_with(record, "edges=off")
    cut = a.save_click(record, x, y, "subpart", start + 1)
    check_parity(python_decoder, record, cut, edges=False)
    points = cut["prompt"]["points"]
    out = python_decoder.run(record["id"], hw, points, [1])
    uncut = python_decoder.masks(out, hw, points, [1], record["id"], regions=False, edges=False)
    raw = uncut[python_decoder.token_for_level(out, "subpart", uncut)]
    got = rle_to_mask(cut["segmentation"])
    assert (got <= raw).all() and got.sum() < raw.sum(), "the specks away from the click are cut"
    assert got[int(points[0][1]), int(points[0][0])]

    assert "clicked regions" not in a.open_with(record, "regions=all&edges=off")
    whole = a.save_click(record, x, y, "subpart", start + 2)
    assert iou(rle_to_mask(whole["segmentation"]), raw) >= 0.999
    assert_no_console_errors(a)


@pytest.mark.skipif(not TRAINED_WEIGHTS, reason="needs the bundled tiny weights")
def test_snapped_edges_fit_the_scene_unless_the_url_says_off(annotator, server, python_decoder, images):
    """With the embedded tiny model the page snaps every answer's edges to the image's colour edges ("snap
    edges", its default for tiny): the part saved at the scene's point is the snapped mask Python gives,
    closer to the scene's true part than the decoder's own mask. With ?edges=off the page saves the
    decoder's mask (SAM's postprocessing)."""
    part = images["scene"]["part"]
    if part is None:
        pytest.skip("no scene generator")
    a = annotator
    record = server["images"]["scene"]
    hw = (record["height"], record["width"])
    x, y = images["scene"]["point"]
    start = len(a.server_annotations(record["id"]))
    assert "snapped edges" in a.open_with(record, "")
    snapped = a.save_click(record, x, y, "part", start + 1)
    check_parity(python_decoder, record, snapped)
    points = snapped["prompt"]["points"]
    out = python_decoder.run(record["id"], hw, points, [1])
    plain = python_decoder.masks(out, hw, points, [1], record["id"], edges=False)
    decoders = plain[python_decoder.token_for_level(out, "part", plain)]
    got = rle_to_mask(snapped["segmentation"])
    assert iou(got, part) > iou(decoders, part) + 0.01, (iou(got, part), iou(decoders, part))

    assert "snapped edges" not in a.open_with(record, "edges=off")
    off = a.save_click(record, x, y, "part", start + 2)
    assert iou(rle_to_mask(off["segmentation"]), decoders) >= 0.999
    assert_no_console_errors(a)


def test_new_category_labels_new_objects_and_relabelling_reaches_the_server(annotator, server, images):
    a = annotator
    record = server["images"]["shapes"]
    a.open(record["id"])
    a.page.fill("[data-testid=category-name]", "wheel")
    a.page.click("[data-testid=category-add]")
    a.page.wait_for_function(
        "(() => { const s = document.querySelector('[data-testid=category-select]');"
        " return s.selectedOptions.length && s.selectedOptions[0].textContent === 'wheel'; })()"
    )
    cats = {c["name"]: c["id"] for c in http_json(server["base"], "/api/categories")}
    assert "wheel" in cats
    start = len(a.server_annotations(record["id"]))
    x, y = images["shapes"]["point"]
    a.click(record, x, y)
    a.wait_candidates(3)
    saved = a.accept(record, start + 1)
    assert saved["category_id"] == cats["wheel"]
    # Relabel that object to another category from the object list.
    other = http_json(server["base"], "/api/categories", "POST", {"name": "tyre"})
    a.page.reload()
    a.wait_ready(record["id"])
    row = a.page.locator(f"[data-testid=object][data-object-id='{saved['id']}']")
    row.locator("[data-testid=object-category]").select_option(str(other["id"]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ann = next(x for x in a.server_annotations(record["id"]) if x["id"] == saved["id"])
        if ann["category_id"] == other["id"]:
            break
        time.sleep(0.1)
    assert ann["category_id"] == other["id"]
    # The last category is remembered for the next visit.
    a.page.reload()
    a.wait_ready(record["id"])
    assert a.page.eval_on_selector("[data-testid=category-select]", "s => s.selectedOptions[0].textContent") == "wheel"
    assert_no_console_errors(a)


def test_clicks_stay_exact_when_zoomed_and_panned(annotator, server):
    a = annotator
    record = server["images"]["shapes"]
    a.open(record["id"])
    box = a.stage_box()
    a.page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.4)
    a.page.mouse.wheel(0, -400)
    # Middle-button drag pans.
    a.page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    a.page.mouse.down(button="middle")
    a.page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.55, steps=3)
    a.page.mouse.up(button="middle")
    m = a.page.eval_on_selector("#world", "w => getComputedStyle(w).transform")
    vals = [float(v) for v in re.findall(r"-?[\d.]+(?:e-?\d+)?", m)]
    zoom, pan_x, pan_y = vals[0], vals[4], vals[5]
    assert zoom > 1.5
    tx, ty = 450.0, 170.0  # image pixel to hit
    cx = box["x"] + pan_x + tx * box["width"] / record["width"] * zoom
    cy = box["y"] + pan_y + ty * box["height"] / record["height"] * zoom
    a.page.mouse.click(cx, cy)
    a.wait_candidates(3)
    start = len(a.server_annotations(record["id"]))
    saved = a.accept(record, start + 1)
    px, py = saved["prompt"]["points"][0]
    assert abs(px - tx) < 0.5 and abs(py - ty) < 0.5
    assert_no_console_errors(a)


def test_arrow_keys_move_between_images_and_count_the_done_ones(annotator, server):
    a = annotator
    first, second = server["images"]["scene"], server["images"]["shapes"]
    a.open(first["id"])
    a.page.keyboard.press("ArrowRight")
    a.wait_ready(second["id"])
    done = a.page.inner_text("[data-testid=done-count]")
    with_objects = sum(1 for r in http_json(server["base"], "/api/images") if r["num_annotations"] > 0)
    assert done.startswith(f"{with_objects} of 2")
    a.page.keyboard.press("ArrowLeft")
    a.wait_ready(first["id"])
    assert_no_console_errors(a)


def test_a_failing_embedding_shows_the_servers_message(annotator, server):
    a = annotator
    record = server["images"]["shapes"]
    message = "The model could not embed this image: out of memory."
    a.page.route(
        re.compile(r".*/api/images/\d+/embedding$"),
        lambda route: route.fulfill(status=500, content_type="application/json", body=json.dumps({"error": message})),
    )
    a.page.goto(f"{server['base']}/?image={record['id']}")
    a.page.wait_for_selector("[data-testid=error]:not([hidden])")
    assert a.page.inner_text("[data-testid=error]") == message
    assert a.page.get_attribute("[data-testid=stage]", "data-ready") == "false"
    # The only console error is the browser's own note about the 500.
    assert all("500" in e for e in a.errors), a.errors


def test_object_list_hides_deletes_and_undo_brings_a_deleted_object_back(annotator, server, images):
    a = annotator
    record = server["images"]["shapes"]
    start = a.start_on(record)
    x, y = images["shapes"]["point"]
    a.click(record, x, y)
    a.wait_candidates(3)
    saved = a.accept(record, start + 1)
    row = a.page.locator(f"[data-testid=object][data-object-id='{saved['id']}']")
    row.locator("[data-testid=object-hide]").click()
    assert row.locator("[data-testid=object-hide]").inner_text() == "show"
    assert len(a.server_annotations(record["id"])) == start + 1, "hiding is a view setting, not a deletion"
    row.locator("[data-testid=object-delete]").click()
    a.wait_server_count(record["id"], start)
    a.wait_objects(start)
    a.page.keyboard.press("Control+z")
    anns = a.wait_server_count(record["id"], start + 1)
    a.wait_objects(start + 1)
    restored = anns[-1]
    assert restored["segmentation"]["counts"] == saved["segmentation"]["counts"]
    assert restored["category_id"] == saved["category_id"] and restored["level"] == saved["level"]
    assert_no_console_errors(a)


def test_loading_state_shows_until_the_embedding_arrives(annotator, server):
    a = annotator
    record = server["images"]["scene"]
    held = []
    a.page.route(re.compile(r".*/api/images/\d+/embedding$"), lambda route: held.append(route))
    a.page.goto(f"{server['base']}/?image={record['id']}", wait_until="domcontentloaded")
    a.page.wait_for_function("document.querySelector('[data-testid=loading]').textContent.includes('embedding')")
    assert a.page.is_visible("[data-testid=loading]")
    assert a.page.get_attribute("[data-testid=stage]", "data-ready") == "false"
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        a.page.wait_for_timeout(50)
    held[0].continue_()
    a.wait_ready(record["id"])
    assert not a.page.is_visible("[data-testid=loading]")
    assert_no_console_errors(a)
