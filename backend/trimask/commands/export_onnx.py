"""``trimask export-onnx``: write a model's prompt encoder + mask decoder as ONNX."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from trimask.errors import TrimaskError


def run(args: argparse.Namespace) -> int:
    from trimask.export.onnx_decoder import export_decoder
    from trimask.models.build import MODEL_TYPES, build_sam

    if args.model not in MODEL_TYPES:
        raise TrimaskError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_TYPES)}")
    out = Path(args.out)
    if out.is_dir():
        raise TrimaskError(f"--out {out} is a folder; give a file name such as {out / 'decoder.onnx'}")
    steps = ["load model", "export"] + (["quantize"] if args.quantize else [])
    with tqdm(total=len(steps), desc="export-onnx", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str(steps[0])
        sam = build_sam(args.model, args.checkpoint)
        bar.update()
        bar.set_postfix_str(" + ".join(steps[1:]))
        try:
            export_decoder(sam, out, quantize=args.quantize)
        except OSError as exc:
            raise TrimaskError(f"cannot write {out}: {exc.strerror or exc}") from exc
        bar.update(len(steps) - 1)
    size_mb = out.stat().st_size / 1e6
    kind = "quantized (uint8 weights)" if args.quantize else "fp32"
    print(f"wrote {out} ({kind}, {size_mb:.1f} MB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export-onnx",
        help="export the prompt encoder + mask decoder as ONNX for the browser",
        description="Export a model's prompt encoder and mask decoder as one ONNX file "
        "(opset 17, any image size, all four mask tokens plus small display masks).",
    )
    parser.add_argument("--model", required=True, help="vit_h, vit_l, vit_b, vit_t or tiny")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="weights file (official checkpoint for vit_*; default: bundled weights for tiny, "
        "random weights for the others)",
    )
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--quantize", action="store_true", help="dynamic uint8 weight quantization (about 3.5x smaller)"
    )
    parser.set_defaults(func=run)
