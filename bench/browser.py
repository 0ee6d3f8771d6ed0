"""Browser latency of the annotator in headless Chromium (Playwright), against `trimask serve`.

Measured from the page's own debug hook (window.__trimaskTimings):

- click: mouse-up -> the three candidates decoded and drawn (overlay + thumbnails), and
  decode: the part of it inside the worker (session.run and output handling);
  hover previews are off for these (?hover=0) so a click never waits behind one.
- hover: pointer move -> the preview drawn, one move at a time (latency), and the
  previews per second drawn while the pointer keeps moving (throughput): moved by Playwright
  (each move a round trip through its driver and the browser process, on the same two cores),
  and moved in the page, 60 mouse events a second from a timer, as a real mouse's arrive.
- page open -> ready: navigation start -> data-ready (decoder downloaded and loaded,
  embedding in the worker); image switch -> ready: arrow key to this image -> data-ready
  (decoder already loaded, embedding cached on the server).

Clicks and hovers are taken in turn across the decoders' pages (one page each), so
load from other work on the machine hits every decoder alike and the ratios stay fair.

For trimask's decoder (fp32, quantized, and fp32 with the factored fast path of
export/prepared_decoder.py: every projection of the image embedding once per image, low-rank
corrections per click) and for SAM's official export style (one
graph returning four float masks at full image resolution, exported with the onnx
helper's code in bench/decoder.py from the same weights), WASM with 1 and 2 threads,
on a 1536 x 1024 and a 4000 x 3000 image (W x H). Prints markdown tables.

With 2 threads trimask's page runs two one-thread decoder workers beside the main one (each
click on the worker lately faster: one thread beats two when other work holds a core; hover
previews on the two one-thread workers side by side; see frontend/src/decoder_client.ts); "fast1w"
times the fast path without them, "fastnopair" with one (previews one at a time), "fastclickgraph" with hover
previews from the per-click graph instead of the hover graph (export/hover_decoder.py), "fastall" the fast path
without the "clicked regions" cut (frontend/src/mask_regions.ts; the tiny model's default), "fastnosnap" the fast
path without snapped edges (frontend/src/edge_snap.ts; the tiny model's default), and the official
style always runs as a plain page would: one worker with all the threads. After each click or
hover the benchmark waits until the page decodes nothing (its background probes included).

    .venv/bin/python bench/browser.py [--clicks 15] [--hovers 15]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SIZES = ((1536, 1024), (4000, 3000))  # (W, H)
OFFICIAL_URL = "/bench/official.onnx"


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    """Generated scenes resized to the benchmark sizes (content matters little for timing)."""
    from PIL import Image, ImageDraw

    names = []
    for w, h in sizes:
        try:
            from trimask.training.scenes import generate_scene

            im = Image.fromarray(generate_scene(900_321, size=768).image).resize((w, h), Image.BILINEAR)
        except ImportError:
            im = Image.new("RGB", (w, h), (40, 90, 40))
            ImageDraw.Draw(im).ellipse((w // 5, h // 5, w // 2, h // 2), fill=(220, 60, 60))
        name = f"bench_{w}x{h}.png"
        im.save(folder / name)
        names.append(name)
    return names


def model_args(tmp: Path) -> tuple[list[str], str | None]:
    """CLI args for the embedded default model (random 'tiny' weights if the trained file is missing)."""
    from trimask.models.build import BUNDLED_TINY_CHECKPOINT

    if Path(BUNDLED_TINY_CHECKPOINT).is_file():
        return ["--model", "tiny"], None
    import torch

    from trimask.models.build import build_sam

    ckpt = tmp / "tiny_random.pt"
    torch.save(build_sam("tiny", random_init=True).state_dict(), ckpt)
    print("note: no bundled tiny.pt yet, timing random tiny weights (same graph, same cost)", file=sys.stderr)
    return ["--model", "tiny", "--checkpoint", str(ckpt)], str(ckpt)


def export_official(checkpoint: str | None, out: Path) -> bytes:
    """SAM's official export style for the same weights, with the onnx helper's exporter."""
    import torch

    from trimask.models.build import build_sam

    spec = importlib.util.spec_from_file_location("bench_decoder", REPO / "bench" / "decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)
    module.export_official_style(build_sam("tiny", checkpoint), out)
    return out.read_bytes()


def export_fast_path(checkpoint: str | None, folder: Path) -> tuple[bytes, bytes]:
    """The optional two-graph fast path for the same weights (prepare, prepared)."""
    import torch

    from trimask.export.prepared_decoder import export_prepared_decoder
    from trimask.models.build import build_sam

    torch.set_num_threads(1)
    prepare, prepared = export_prepared_decoder(
        build_sam("tiny", checkpoint), folder / "decoder_prepare.onnx", folder / "decoder_prepared.onnx"
    )
    return prepare.read_bytes(), prepared.read_bytes()


def start_server(images: Path, annotations: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).with_name("trimask")
    cmd = [str(exe), "serve", "--images", str(images), "--annotations", str(annotations),
           "--host", "127.0.0.1", "--port", "0", "--no-precompute", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("trimask serve did not start")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as r:
        return r.read()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def serve_bytes(body: bytes):
    """A Playwright route handler answering with `body`."""
    return lambda route: route.fulfill(status=200, body=body, headers={"Content-Type": "application/octet-stream"})


class Session:
    """One page opened with given settings; collects timings through the debug hook."""

    def __init__(self, browser, base: str, image: dict, query: str, files: dict[str, bytes]) -> None:
        """files: URL path (with query) -> bytes the page gets for it instead of asking the server."""
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        for path, body in files.items():
            # A regex on the whole path: a glob would also match the page URL, whose query names the file.
            self.page.route(re.compile(r"^https?://[^/]+" + re.escape(path) + "$"), serve_bytes(body))
        self.image = image
        self.query = query
        self.page.goto(f"{base}/?image={image['id']}&{query}")
        try:
            self.page.wait_for_selector("[data-testid=stage][data-ready=true]", timeout=300_000)
        except Exception:
            shown = self.page.inner_text("body")[:300]
            raise SystemExit(f"the page ({query}) never got ready: {self.errors} {shown!r}") from None
        self.ready_ms = self.page.evaluate("performance.now()")
        # The worker reports the thread count onnxruntime-web really uses (1 without cross-origin isolation).
        self.status = self.page.inner_text("[data-testid=status]")
        self.box = self.page.locator("[data-testid=stage]").bounding_box()

    def client(self, fx: float, fy: float) -> tuple[float, float]:
        return self.box["x"] + fx * self.box["width"], self.box["y"] + fy * self.box["height"]

    def count(self, kind: str) -> int:
        return self.page.evaluate(f"window.__trimaskTimings.{kind}.length")

    def click_once(self, fx: float, fy: float) -> None:
        """One click on an empty prompt, waiting until its candidates are drawn."""
        self.page.keyboard.press("Escape")
        before = self.count("click")
        self.page.mouse.click(*self.client(fx, fy))
        self.page.wait_for_function(f"window.__trimaskTimings.click.length > {before}", timeout=600_000)
        self.wait_idle()

    def wait_idle(self) -> None:
        """Until no decode runs in the page (a background probe included), so the next page's
        interaction never shares the cores with this one's work."""
        self.page.wait_for_function("!window.__trimaskTimings.busy", timeout=600_000)

    def hover_once(self, fx: float, fy: float) -> None:
        before = self.count("hover")
        self.page.mouse.move(*self.client(fx, fy))
        self.page.wait_for_function(f"window.__trimaskTimings.hover.length > {before}", timeout=600_000)
        self.wait_idle()

    def switch_back_ms(self, index: int, count: int) -> float:
        """To the neighbouring image and back (arrow keys): ms from choosing this image again to ready."""
        if count < 2:
            return float("nan")
        for key in ("ArrowRight", "ArrowLeft") if index == 0 else ("ArrowLeft", "ArrowRight"):
            before = self.count("open")
            self.page.keyboard.press(key)
            self.page.wait_for_function(f"window.__trimaskTimings.open.length > {before}", timeout=300_000)
        return self.page.evaluate("window.__trimaskTimings.open.at(-1)")

    def timings(self, kind: str, warmup: int) -> list[float]:
        return self.page.evaluate(f"window.__trimaskTimings.{kind}")[warmup:]

    def hover_rate(self, seconds: float = 4.0) -> float:
        """Previews drawn per second while the pointer sweeps the image continuously."""
        before = self.count("hover")
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < seconds:
            fx = 0.2 + 0.6 * (0.5 + 0.5 * np.sin(i / 7))
            fy = 0.2 + 0.6 * (0.5 + 0.5 * np.cos(i / 11))
            self.page.mouse.move(*self.client(fx, fy))
            i += 1
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        rate = (self.count("hover") - before) / elapsed
        self.wait_idle()
        return rate

    def hover_rate_in_page(self, seconds: float = 4.0) -> float:
        """The same sweep with the pointer moves made in the page (mouse events dispatched at 60/s
        from a timer), as a real mouse's reach the page: no Playwright round trip per move, whose
        driver and browser-side work otherwise share the two cores with the decoder."""
        self.page.mouse.move(*self.client(0.5, 0.5))  # the pointer enters the stage
        before = self.count("hover")
        box = self.box
        elapsed = self.page.evaluate(
            """([x0, y0, w, h, ms]) => new Promise((done) => {
                const t0 = performance.now(); let i = 0;
                const timer = setInterval(() => {
                    const fx = 0.2 + 0.6 * (0.5 + 0.5 * Math.sin(i / 7)), fy = 0.2 + 0.6 * (0.5 + 0.5 * Math.cos(i / 11));
                    window.dispatchEvent(new MouseEvent("mousemove", { clientX: x0 + fx * w, clientY: y0 + fy * h, bubbles: true }));
                    i++;
                    if (performance.now() - t0 >= ms) { clearInterval(timer); done(performance.now() - t0); }
                }, 1000 / 60);
            })""",
            [box["x"], box["y"], box["width"], box["height"], seconds * 1000],
        )
        rate = (self.count("hover") - before) / (elapsed / 1000)
        self.wait_idle()
        return rate

    def close(self) -> None:
        if self.errors:
            print(f"page errors: {self.errors}", file=sys.stderr)
        self.context.close()


def wait_for_one_thread_workers(pages: dict, threads: int) -> None:
    """With 2+ threads trimask's page starts one-thread workers after the main one: time it once they decode."""
    if threads < 2:
        return
    for name, s in pages.items():
        if "secondworker=0" not in s.query:
            s.page.wait_for_function(
                "document.querySelector('[data-testid=status]').textContent.includes('1-thread worker')", timeout=120_000
            )


def time_interleaved(browser, base: str, im: dict, threads: int, decoders: dict, files: dict, args) -> list[dict]:
    """All decoders on one image and thread count, one page each, clicks taken in turn so
    load from elsewhere on the machine hits every decoder alike (the ratio stays fair)."""
    label = f"{im['width']}x{im['height']} threads={threads}"
    print(f"  {label}: clicks", file=sys.stderr)
    pages = {name: Session(browser, base, im, f"threads={threads}&hover=0&{q}", files) for name, q in decoders.items()}
    wait_for_one_thread_workers(pages, threads)
    rng = np.random.default_rng(0)
    # The browser optimizes a worker's WASM code only after its first decodes (up to 3x slower).
    warmup = 5
    for _ in range(args.clicks + warmup):
        fx, fy = rng.uniform(0.15, 0.85, 2)
        for s in pages.values():
            s.click_once(fx, fy)
    for name, s in pages.items():
        if f"{threads} thread" not in s.status:
            print(f"warning: {name} asked for {threads} threads, the page says {s.status!r}", file=sys.stderr)
    rows = {name: dict(image=f"{im['width']} x {im['height']}", decoder=name, threads=threads,
                       click=s.timings("click", warmup), decode=s.timings("decode", warmup), ready=s.ready_ms,
                       switch=s.switch_back_ms(im["index"], im["count"]),
                       hover=[], rate=float("nan"), rate_in_page=float("nan"))
            for name, s in pages.items()}
    for s in pages.values():
        s.close()
    print(f"  {label}: hovers", file=sys.stderr)
    hover_pages = {name: Session(browser, base, im, f"threads={threads}&{q}", files)
                   for name, q in decoders.items() if "official" not in name}
    wait_for_one_thread_workers(hover_pages, threads)
    for _ in range(args.hovers + warmup):
        fx, fy = rng.uniform(0.15, 0.85, 2)
        for s in hover_pages.values():
            s.page.keyboard.press("Escape")
            s.hover_once(fx, fy)
    for name, s in hover_pages.items():
        rows[name]["hover"] = s.timings("hover", warmup)
        rows[name]["rate"] = s.hover_rate()
        rows[name]["rate_in_page"] = s.hover_rate_in_page()
        s.close()
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=15, help="timed clicks per configuration")
    parser.add_argument("--hovers", type=int, default=15, help="timed hover previews per configuration")
    parser.add_argument("--threads", default="1,2", help="WASM thread counts to time")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="image sizes WxH")
    parser.add_argument("--decoders", default="fp32,quantized,fast,official",
                        help="which decoders to time, of fp32, quantized, fast, fast1w (fast without the one-thread "
                             "workers), fastnopair (fast with one one-thread worker: no hover pair), fastclickgraph "
                             "(fast, previews from the per-click graph), fastall (fast without the clicked-regions cut), "
                             "fastnosnap (fast without snapped edges), "
                             "official (always timed: the ratios need it)")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    from playwright.sync_api import sync_playwright

    load_before = os.getloadavg()[0]
    loads: list[float] = []
    sampling = threading.Event()

    def sample_load() -> None:
        while not sampling.wait(5.0):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="trimask-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "images").mkdir()
        names = write_images(tmp / "images", sizes)
        margs, checkpoint = model_args(tmp)
        print("exporting the official-style decoder ...", file=sys.stderr)
        official = export_official(checkpoint, tmp / "official.onnx")
        proc, base = start_server(tmp / "images", tmp / "annotations", margs)
        try:
            listed = json.loads(get(base + "/api/images"))
            images = [dict(r, index=i, count=len(listed)) for i, r in enumerate(listed) if r["file_name"] in names]
            print("warming up: decoder exports and embeddings ...", file=sys.stderr)
            get(base + "/api/decoder.onnx")
            get(base + "/api/decoder.onnx?quantized=1")
            cold = {}
            for im in images:
                t = time.perf_counter()
                get(f"{base}/api/images/{im['id']}/embedding")
                cold[im["file_name"]] = (time.perf_counter() - t) * 1000
            choices = {
                "fp32": ("trimask fp32", "fast=0"),
                "quantized": ("trimask quantized", "fast=0&quantized=1"),
                "fast": ("trimask fp32 + prepared fast path", "fast=1"),
                # The same without the one-thread workers (the main worker with all threads only).
                "fast1w": ("trimask fp32 + prepared fast path, no one-thread workers", "fast=1&secondworker=0"),
                # The same with one one-thread worker: hover previews one at a time, no pair side by side.
                "fastnopair": ("trimask fp32 + prepared fast path, one one-thread worker (no hover pair)", "fast=1&hoverpair=0"),
                # Hover previews from the per-click graph (all four masks) instead of the hover graph.
                "fastclickgraph": ("trimask fp32 + prepared fast path, previews from the click graph", "fast=1&hovergraph=0"),
                # The fast path with every answer's regions kept (the "clicked regions" cut off; on by default for tiny).
                "fastall": ("trimask fp32 + prepared fast path, regions=all", "fast=1&regions=all"),
                # The fast path with the decoder's own edges (snapped edges off; on by default for tiny).
                "fastnosnap": ("trimask fp32 + prepared fast path, edges=off", "fast=1&edges=off"),
                # SAM's export style as a plain onnxruntime-web page would run it: one worker, all threads.
                "official": ("official style fp32", f"style=official&decoder={OFFICIAL_URL}&secondworker=0"),
            }
            wanted = {*args.decoders.split(","), "official"}
            decoders = dict(choices[k] for k in choices if k in wanted)
            files = {OFFICIAL_URL: official}
            status = json.loads(get(base + "/api/status"))
            if "prepared" not in status.get("decoder_parts", []):
                # The server does not serve the fast path (yet): the page gets our export of it.
                prepare, prepared = export_fast_path(checkpoint, tmp)
                files["/api/decoder.onnx?part=prepare"] = prepare
                files["/api/decoder.onnx?part=prepared"] = prepared
            rows = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                for im in images:
                    for n in threads:
                        rows += time_interleaved(browser, base, im, n, decoders, files, args)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    sampling.set()
    official_p50 = {(r["image"], r["threads"]): pct(r["click"], 50) for r in rows if "official" in r["decoder"]}
    print(f"\nHeadless Chromium {CHROMIUM}, WASM (SIMD, threads as listed), {os.cpu_count()} CPU cores; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"{min(loads, default=load_before):.1f} to {max(loads, default=load_before):.1f} during "
          f"(median {pct(loads, 50):.1f}; the other load shares the cores, hence the same-run ratios).\n")
    print("| image (W x H) | decoder | threads | click p50 ms | click p95 ms | click vs official | decode p50 ms | "
          "hover p50 ms | hover p95 ms | hover previews/s | previews/s, in-page pointer | page open -> ready ms | "
          "image switch -> ready ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = pct(r["click"], 50) / official_p50[(r["image"], r["threads"])]
        hover = (f"{pct(r['hover'], 50):.0f} | {pct(r['hover'], 95):.0f} | {r['rate']:.1f} | {r['rate_in_page']:.1f}"
                 if r["hover"] else "- | - | - | -")
        print(f"| {r['image']} | {r['decoder']} | {r['threads']} | {pct(r['click'], 50):.0f} | "
              f"{pct(r['click'], 95):.0f} | {ratio:.2f}x | {pct(r['decode'], 50):.0f} | {hover} | {r['ready']:.0f} | {r['switch']:.0f} |")
    print("\nFirst embedding of each image on the server (encoder, not cached yet): "
          + ", ".join(f"{k}: {v:.0f} ms" for k, v in cold.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
