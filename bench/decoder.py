"""Per-click decoder time in onnxruntime (Python, CPU) and the quantized decoder's agreement.

Three graphs of the same weights, timed click by click in turn (so load on
the machine hits all alike), at two image sizes:

- ``official style``: what SAM's own ONNX export returns when asked for all
  masks: four float masks upsampled to the full image size (bilinear to
  1024 x 1024, crop, bilinear to H x W), plus scores and low-res logits.
  Written here with the crop taken from ``orig_im_size`` in the graph so it
  is valid for any size (the official script bakes the traced size in).
- ``ours fp32`` and ``ours quantized``: trimask's decoder.onnx
  (low-res logits + 512-px uint8 display masks + areas).
- ``ours ..., prepared``: the fast path (decoder_prepared.onnx after
  decoder_prepare.onnx ran once for the image; see prepared_decoder.py), for
  every prompt kind, mask input included. decoder_prepare.onnx is always fp32;
  its time per image (wall and one-thread CPU) and the size of the per-image
  state it makes are printed below the table.

Then the agreement of the quantized decoder with fp32: IoU of each token's
thresholded mask over many prompts on embeddings of real images (the
scikit-image sample photos and generated scenes) from the same model.

    .venv/bin/python bench/decoder.py [--model tiny] [--clicks 200] [--threads 2]

Prints markdown tables: wall-clock median and p95 in ms with ``--threads``
intra-op threads and the ratio to the official style; and, because wall time on
a shared 2-core machine depends on what else runs, the median CPU time of the
same clicks on one thread (``time.thread_time``) and its ratio, which does not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from trimask.export import verify
from trimask.export.onnx_decoder import INPUT_NAMES, DecoderOnnx, example_inputs, export_decoder, resized_size
from trimask.export.prepared_decoder import PREPARED_INPUTS, export_prepared_decoder

SIZES = ((1024, 1536), (3000, 4000))


class OfficialStyleDecoder(DecoderOnnx):
    """Same prompt handling and decoder; outputs as SAM's export with return_single_mask=False."""

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        dense = self.embed_mask(mask_input, has_mask_input)
        scores, low_res = self.decode(image_embeddings, point_coords, point_labels, dense)
        masks = F.interpolate(low_res, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
        valid = resized_size(orig_im_size, self.input_size)
        masks = masks[..., : valid[0], : valid[1]]
        size = orig_im_size.to(torch.int64)
        masks = F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)
        return masks, scores, low_res


def export_official_style(sam: torch.nn.Module, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            OfficialStyleDecoder(sam).eval(),
            example_inputs(),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {1: "n"}, "point_labels": {1: "n"}, "masks": {2: "h", 3: "w"}},
            opset_version=17,
            dynamo=False,
        )


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sample_images() -> list[np.ndarray]:
    """Real photos bundled with scikit-image plus generated scenes (uint8 H x W x 3)."""
    images = []
    try:
        import skimage.data

        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            image = np.asarray(getattr(skimage.data, name)())
            images.append(image[..., :3] if image.ndim == 3 else np.stack([image] * 3, -1))
    except ImportError:
        print("scikit-image missing: agreement on generated scenes only", file=sys.stderr)
    try:
        from trimask.training.scenes import generate_scene

        images += [generate_scene(900_000 + i, size=512).image for i in range(4)]
    except ImportError:
        pass
    return images


@torch.no_grad()
def embed(sam: torch.nn.Module, images: list[np.ndarray]) -> list[tuple[np.ndarray, tuple[int, int]]]:
    from trimask.preprocess import preprocess

    return [(sam.image_encoder(preprocess(image)).numpy(), image.shape[:2]) for image in images]


class WithState:
    """A decoder_prepared session that takes decoder.onnx's feeds (for verify.agreement)."""

    def __init__(self, prepared_session, state: dict[str, np.ndarray]) -> None:
        self.session, self.state = prepared_session, state

    def run(self, names, feeds: dict[str, np.ndarray]):
        return self.session.run(names, {k: v for k, v in feeds.items() if k in PREPARED_INPUTS} | self.state)


def time_clicks(
    sessions: dict,
    embeddings: list[np.ndarray],
    states: list[dict],
    size: tuple[int, int],
    clicks: int,
    seed: int,
    clock=time.perf_counter,
):
    """-> {name: array of per-click seconds}; one prompt per click, every session runs it in turn.

    clock: time.perf_counter (wall) or time.thread_time (CPU time of this thread: with
    one intra-op thread onnxruntime computes on the caller's thread, so this counts the
    work alone, not the waiting when other processes load the machine).

    Sessions whose name contains "prepared" get the prompt inputs and the image's prepared state.
    """
    rng = np.random.default_rng(seed)
    times = {name: [] for name in sessions}
    for i in range(clicks + 10):
        image = i % len(embeddings)
        feeds = verify.onnx_feeds(embeddings[image], verify.random_prompt(rng, size), size)
        prepared_feeds = {k: v for k, v in feeds.items() if k in PREPARED_INPUTS} | states[image]
        for name, sess in sessions.items():
            start = clock()
            sess.run(None, prepared_feeds if "prepared" in name else feeds)
            if i >= 10:  # warm-up clicks are not counted
                times[name].append(clock() - start)
    return {name: np.array(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b", help="model type (default vit_b)")
    parser.add_argument("--checkpoint", default=None, help="weights (default: random / bundled)")
    parser.add_argument("--random-init", action="store_true", help="random weights even for tiny")
    parser.add_argument("--clicks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--prompts", type=int, default=50, help="agreement prompts per image")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args(argv)

    from trimask.models.build import build_sam, model_identity

    torch.set_num_threads(args.threads)
    sam = build_sam(args.model, args.checkpoint, random_init=args.random_init)
    identity = model_identity(args.model, args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "official style (4 full-res f32 masks)": Path(tmp) / "official.onnx",
            "ours fp32": Path(tmp) / "decoder.onnx",
            "ours quantized": Path(tmp) / "decoder.quant.onnx",
            "ours fp32, prepared": Path(tmp) / "decoder_prepared.onnx",
            "ours quantized, prepared": Path(tmp) / "decoder_prepared.quant.onnx",
        }
        names = list(paths)
        export_official_style(sam, paths[names[0]])
        export_decoder(sam, paths[names[1]])
        export_decoder(sam, paths[names[2]], quantize=True)
        prepare_path = Path(tmp) / "decoder_prepare.onnx"
        export_prepared_decoder(sam, prepare_path, paths[names[3]])
        export_prepared_decoder(sam, Path(tmp) / "unused.onnx", paths[names[4]], quantize=True)
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        prepare = session(prepare_path, args.threads)
        sizes_mb = {name: os.path.getsize(path) / 1e6 for name, path in paths.items()}

        images = sample_images()
        embedded = embed(sam, images) if not args.skip_agreement else []
        rng = np.random.default_rng(0)
        timing_embeddings = [e for e, _ in embedded][:4] or [
            (rng.standard_normal((1, 256, 64, 64)) * 0.3).astype(np.float32) for _ in range(4)
        ]

        prepare_names = [o.name for o in prepare.get_outputs()]
        prepare_single = session(prepare_path, 1)
        states, prepare_times, prepare_cpu = [], [], []
        for embedding in timing_embeddings * 5:
            start = time.perf_counter()
            outputs = prepare.run(None, {"image_embeddings": embedding})
            prepare_times.append(time.perf_counter() - start)
            start = time.thread_time()
            prepare_single.run(None, {"image_embeddings": embedding})
            prepare_cpu.append(time.thread_time() - start)
            states.append(dict(zip(prepare_names, outputs)))
        states = states[: len(timing_embeddings)]
        state_mb = sum(value.nbytes for value in states[0].values()) / 1e6

        print(f"\nPer-click decode time, onnxruntime {__import__('onnxruntime').__version__} CPU, "
              f"{args.threads} threads, model {identity}, {args.clicks} clicks (mixed points / boxes)\n")
        print("| image (H x W) | decoder | file MB | p50 ms | p95 ms | p50 vs official "
              "| CPU ms, 1 thread (p50) | CPU vs official |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        single = {name: session(path, 1) for name, path in paths.items()}
        for size in SIZES:
            times = time_clicks(sessions, timing_embeddings, states, size, args.clicks, seed=size[0])
            cpu = time_clicks(single, timing_embeddings, states, size, args.clicks, seed=size[0], clock=time.thread_time)
            base, cpu_base = np.median(times[names[0]]), np.median(cpu[names[0]])
            for name in names:
                p50, p95 = np.median(times[name]) * 1e3, np.percentile(times[name], 95) * 1e3
                cpu_p50 = np.median(cpu[name]) * 1e3
                print(f"| {size[0]} x {size[1]} | {name} | {sizes_mb[name]:.1f} | {p50:.1f} | {p95:.1f} "
                      f"| {np.median(times[name]) / base:.2f}x | {cpu_p50:.1f} | {np.median(cpu[name]) / cpu_base:.2f}x |")
            sys.stdout.flush()
        print(f"\n\"prepared\": decoder_prepare.onnx ({os.path.getsize(prepare_path) / 1e6:.1f} MB, fp32) runs once "
              f"per image: p50 {np.median(prepare_times) * 1e3:.1f} ms, p95 {np.percentile(prepare_times, 95) * 1e3:.1f} ms "
              f"wall ({args.threads} threads), {np.median(prepare_cpu) * 1e3:.1f} ms CPU on one thread "
              f"({len(prepare_cpu)} runs); it makes {state_mb:.1f} MB of fp32 state per image, which the click graph "
              f"reads instead of the 4096 image tokens' dense projections.")

        if embedded:
            print(f"\nQuantized vs fp32 decoder.onnx agreement ({len(embedded)} images embedded by {identity}, "
                  f"{args.prompts} random prompts each, 4 tokens per prompt; IoU of masks > 0 "
                  f"in the image's 256-frame region)\n")
            keys = ["masks", "iou_mean", "iou_median", "iou_p5", "iou_min", "share_iou_ge_0.9",
                    "score_diff_mean", "score_diff_max"]
            print("| quantized graph | masks | mean IoU | median IoU (of per-image medians) | worst per-image p5 IoU "
                  "| min IoU | share IoU >= 0.9 | mean abs score diff | max abs score diff |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for name in (names[2], names[4]):
                stats_per_image = []
                for embedding, hw in embedded:
                    quantized = sessions[name]
                    if "prepared" in name:
                        state = dict(zip(prepare_names, prepare.run(None, {"image_embeddings": embedding})))
                        quantized = WithState(quantized, state)
                    stats_per_image.append(
                        verify.agreement(sessions[names[1]], quantized, [embedding], hw, args.prompts, seed=1)
                    )
                total = sum(s["masks"] for s in stats_per_image)
                merged = {
                    "masks": total,
                    "iou_mean": sum(s["iou_mean"] * s["masks"] for s in stats_per_image) / total,
                    "iou_median": float(np.median([s["iou_median"] for s in stats_per_image])),
                    "iou_p5": min(s["iou_p5"] for s in stats_per_image),
                    "iou_min": min(s["iou_min"] for s in stats_per_image),
                    "share_iou_ge_0.9": sum(s["share_iou_ge_0.9"] * s["masks"] for s in stats_per_image) / total,
                    "score_diff_mean": sum(s["score_diff_mean"] * s["masks"] for s in stats_per_image) / total,
                    "score_diff_max": max(s["score_diff_max"] for s in stats_per_image),
                }
                print(f"| {name} | " + " | ".join(
                    f"{int(merged[k])}" if k == "masks" else f"{merged[k]:.4f}" for k in keys) + " |")
            print(f"\nFile size: fp32 {sizes_mb[names[1]]:.1f} MB, quantized {sizes_mb[names[2]]:.1f} MB; "
                  f"prepared fp32 {sizes_mb[names[3]]:.1f} MB, quantized {sizes_mb[names[4]]:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
