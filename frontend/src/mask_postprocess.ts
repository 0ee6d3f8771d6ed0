/**
 * SAM's mask postprocessing, with torch's numerics:
 *   logits 256x256 -> F.interpolate(1024x1024, bilinear, align_corners=False)
 *   -> crop to the resized image [:newH, :newW]
 *   -> F.interpolate(origH x origW, bilinear, align_corners=False) -> > 0
 *
 * Bilinear resizing is separable; like torch's CPU kernel we interpolate along
 * x first, then y, with float32 weights and source indices computed as
 * src = max(0, scale * (dst + 0.5) - 0.5), scale = in / out.
 */
import { getPreprocessShape, SAM_LONG_SIDE } from "./coordinates";

export const LOW_RES = 256;

/** Per-output-index source indices and weights for one axis. */
export interface AxisWeights {
  i0: Int32Array;
  i1: Int32Array;
  w0: Float32Array;
  w1: Float32Array;
}

/** torch's area_pixel_compute_source_index (align_corners=False) for `outSize` outputs. */
export function axisWeights(inSize: number, outSize: number): AxisWeights {
  const f = Math.fround;
  const scale = f(inSize / outSize);
  const i0 = new Int32Array(outSize);
  const i1 = new Int32Array(outSize);
  const w0 = new Float32Array(outSize);
  const w1 = new Float32Array(outSize);
  for (let d = 0; d < outSize; d++) {
    let src = f(f(scale * f(d + 0.5)) - 0.5);
    if (src < 0) src = 0;
    const lo = Math.floor(src);
    const lambda = f(src - lo);
    i0[d] = lo;
    i1[d] = lo < inSize - 1 ? lo + 1 : lo;
    w1[d] = lambda;
    w0[d] = f(1 - lambda);
  }
  return { i0, i1, w0, w1 };
}

/**
 * Bilinear resize of a row-major H x W float image, like F.interpolate(mode="bilinear",
 * align_corners=False), keeping only the first `keepH` x `keepW` outputs of an
 * outH x outW result (the crop SAM applies after its first upsampling).
 */
export function bilinearResize(
  src: Float32Array,
  inH: number,
  inW: number,
  outH: number,
  outW: number,
  keepH = outH,
  keepW = outW,
): Float32Array {
  const wx = axisWeights(inW, outW);
  const wy = axisWeights(inH, outH);
  const rows = new Float32Array(inH * keepW);
  for (let r = 0; r < inH; r++) {
    const base = r * inW;
    const out = r * keepW;
    for (let x = 0; x < keepW; x++) {
      rows[out + x] = wx.w0[x] * src[base + wx.i0[x]] + wx.w1[x] * src[base + wx.i1[x]];
    }
  }
  const dst = new Float32Array(keepH * keepW);
  for (let y = 0; y < keepH; y++) {
    const a = wy.i0[y] * keepW;
    const b = wy.i1[y] * keepW;
    const w0 = wy.w0[y];
    const w1 = wy.w1[y];
    const out = y * keepW;
    for (let x = 0; x < keepW; x++) dst[out + x] = w0 * rows[a + x] + w1 * rows[b + x];
  }
  return dst;
}

/** A binary mask stored column-major (COCO's order): data[x * height + y] is 0 or 1. */
export interface ColumnMajorMask {
  height: number;
  width: number;
  data: Uint8Array;
}

/**
 * One token's low-res logits (256 x 256, row-major) -> the full-resolution binary
 * mask SAM's postprocess_masks gives, column-major for RLE encoding.
 */
export function postprocessLowRes(lowRes: Float32Array, origH: number, origW: number): ColumnMajorMask {
  const [newH, newW] = getPreprocessShape(origH, origW);
  const resized = bilinearResize(lowRes, LOW_RES, LOW_RES, SAM_LONG_SIDE, SAM_LONG_SIDE, newH, newW);
  // Second resize newH x newW -> origH x origW: x pass stored transposed so the
  // y pass walks each output column contiguously, writing column-major directly.
  const wx = axisWeights(newW, origW);
  const wy = axisWeights(newH, origH);
  const cols = new Float32Array(origW * newH);
  for (let r = 0; r < newH; r++) {
    const base = r * newW;
    for (let x = 0; x < origW; x++) {
      cols[x * newH + r] = wx.w0[x] * resized[base + wx.i0[x]] + wx.w1[x] * resized[base + wx.i1[x]];
    }
  }
  const data = new Uint8Array(origW * origH);
  for (let x = 0; x < origW; x++) {
    const col = x * newH;
    const out = x * origH;
    for (let y = 0; y < origH; y++) {
      const v = wy.w0[y] * cols[col + wy.i0[y]] + wy.w1[y] * cols[col + wy.i1[y]];
      data[out + y] = v > 0 ? 1 : 0;
    }
  }
  return { height: origH, width: origW, data };
}
