"""Benchmark of the annotation service on loopback: saves, cached embeddings, COCO export.

Starts a real ``trimask serve`` process (threaded werkzeug server) on a free
loopback port and drives it with client threads, each holding one keep-alive
``http.client`` connection:

- save: ``POST /api/images/<id>/annotations`` with a realistic compressed RLE of a
  1024 x 768 mask (validated, area/bbox computed, one SQLite transaction with fsync);
- embedding: ``GET /api/images/<id>/embedding`` of a cached embedding (2 MiB of fp16);
- revalidate: the same with ``If-None-Match`` (the browser's 304 path).

Then the COCO export of a database holding ``--annotations`` (default 100k)
annotations, timed as the service does it (query, build, serialize, atomic write).

Prints a markdown table with requests/s and p50/p95 latency. Every run is bounded in
both count and time. Usage: ``.venv/bin/python bench/service.py [--threads 4]``
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ellipse_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An object-like blob: an ellipse whose radius wobbles with the angle (a few kB of RLE at most)."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.sin(rng.integers(3, 9) * angle + rng.uniform(0, 6)) + 0.05 * np.sin(23 * angle)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble**2
    return mask.astype(np.uint8)


def rle_counts(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_util

    return mask_util.encode(np.asfortranarray(mask))["counts"].decode("ascii")


class Server:
    def __init__(self, images: Path, annotations: Path, checkpoint: Path | None):
        cmd = [sys.executable, "-m", "trimask.cli", "serve", "--images", str(images), "--annotations",
               str(annotations), "--port", "0", "--no-precompute", "--device", "cpu"]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise SystemExit("the server did not start")
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                return
        raise SystemExit("the server did not print its URL")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def load(port: int, threads: int, max_requests: int, max_seconds: float, make_request) -> tuple[list[float], float]:
    """Run ``make_request(conn, i)`` from ``threads`` keep-alive clients; returns (latencies s, wall s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.monotonic() + max_seconds
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            status = make_request(conn, i)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if status >= 400:
                    errors.append(str(status))
        conn.close()

    workers = [threading.Thread(target=client) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. HTTP {errors[0]}")
    return latencies, wall


def bench_export(n: int, tmp: Path, repeats: int) -> tuple[float, float, int]:
    """Median seconds to export ``n`` annotations (and the file size)."""
    from trimask.coco_export import export_coco
    from trimask.service import rle, storage

    conn = storage.connect(tmp / "export" / storage.DB_FILENAME)
    files = [storage.ImageFile(f"img_{i:05d}.jpg", 1024, 768, 0, 0) for i in range(max(1, n // 20))]
    ids = list(storage.upsert_images(conn, files).values())
    cat, _ = storage.create_category(conn, "object", "#ff0000")
    rng = np.random.default_rng(0)
    shapes = [rle.normalize_rle({"size": [768, 1024], "counts": rle_counts(ellipse_mask(rng, 768, 1024))})
              for _ in range(50)]

    def rows():
        for i in range(n):
            m = shapes[i % len(shapes)]
            yield storage.AnnotationFields(
                image_id=ids[i % len(ids)], category_id=cat["id"], height=m.height, width=m.width, counts=m.counts,
                area=m.area, bbox=m.bbox, score=0.9, level="whole",
                prompt={"points": [[100.5, 200.5]], "labels": [1], "box": None},
            )

    t0 = time.perf_counter()
    storage.insert_annotations(conn, rows())
    insert_s = time.perf_counter() - t0
    times = []
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, data = export_coco(conn, tmp / "export" / "coco.json")
        times.append(time.perf_counter() - t0)
        size = len(data)
    conn.close()
    return statistics.median(times), insert_s, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4, help="concurrent client connections")
    parser.add_argument("--saves", type=int, default=1000, help="at most this many saves")
    parser.add_argument("--gets", type=int, default=400, help="at most this many embedding downloads")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound of each load phase")
    parser.add_argument("--annotations", type=int, default=100_000, help="annotations in the export benchmark")
    parser.add_argument("--checkpoint", default=None, help="tiny checkpoint (default: bundled, else random)")
    args = parser.parse_args()

    from trimask.models.build import BUNDLED_TINY_CHECKPOINT

    with tempfile.TemporaryDirectory(prefix="trimask-bench-") as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(images / f"img_{i}.png")
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None and not BUNDLED_TINY_CHECKPOINT.is_file():
            import torch

            from trimask.models.build import build_sam

            checkpoint = tmp / "tiny_random.pt"
            torch.save(build_sam("tiny", random_init=True).state_dict(), checkpoint)

        server = Server(images, tmp / "annotations", checkpoint)
        rows = []
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
            conn.request("POST", "/api/categories", body=json.dumps({"name": "object"}),
                         headers={"Content-Type": "application/json"})
            category = json.loads(conn.getresponse().read())["id"]
            conn.request("GET", "/api/images/1/embedding")  # computes and caches it once
            response = conn.getresponse()
            response.read()
            etag = response.getheader("ETag")
            conn.close()

            bodies = [
                json.dumps({
                    "category_id": category,
                    "segmentation": {"size": [768, 1024], "counts": rle_counts(ellipse_mask(rng, 768, 1024))},
                    "score": 0.93, "level": "part",
                    "prompt": {"points": [[512.0, 384.0]], "labels": [1], "box": None},
                }).encode()
                for _ in range(20)
            ]

            def save(conn: http.client.HTTPConnection, i: int) -> int:
                conn.request("POST", "/api/images/1/annotations", body=bodies[i % len(bodies)],
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                return r.status

            def embedding(conn: http.client.HTTPConnection, i: int) -> int:
                conn.request("GET", "/api/images/1/embedding")
                r = conn.getresponse()
                body = r.read()
                assert len(body) == 2 * 256 * 64 * 64
                return r.status

            def revalidate(conn: http.client.HTTPConnection, i: int) -> int:
                conn.request("GET", "/api/images/1/embedding", headers={"If-None-Match": etag})
                r = conn.getresponse()
                r.read()
                return 200 if r.status == 304 else 500

            mean_rle = statistics.mean(len(b) for b in bodies)
            for name, fn, count in (
                (f"save annotation (POST, ~{mean_rle / 1000:.1f} kB RLE body)", save, args.saves),
                ("cached embedding (GET, 2 MiB fp16)", embedding, args.gets),
                ("embedding revalidation (GET, 304)", revalidate, args.saves),
            ):
                latencies, wall = load(server.port, args.threads, count, args.seconds, fn)
                rows.append((name, len(latencies), len(latencies) / wall, percentile(latencies, 50) * 1e3,
                             percentile(latencies, 95) * 1e3))
        finally:
            server.stop()

        export_s, insert_s, size = bench_export(args.annotations, tmp, repeats=3)

    print(f"\nService on loopback: {args.threads} client threads, werkzeug threaded server, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.machine()}\n")
    print("| operation | requests | requests/s | p50 ms | p95 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, n, rps, p50, p95 in rows:
        print(f"| {name} | {n} | {rps:.0f} | {p50:.1f} | {p95:.1f} |")
    print(f"\nCOCO export of {args.annotations:,} annotations (1024x768 masks): "
          f"{export_s:.2f} s median of 3 (query + build + JSON + atomic write; {size / 1e6:.0f} MB file); "
          f"inserting them in one transaction took {insert_s:.2f} s.")


if __name__ == "__main__":
    main()
