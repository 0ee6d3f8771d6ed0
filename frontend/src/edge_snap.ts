/**
 * "Snap edges": an answer's edges moved onto the image's colour edges by a guided filter (He, Sun and
 * Tang), fitted on the decoder's 256 x 256 frame and applied at the output's own pixels (the subsampled
 * "fast guided filter"). The embedded tiny model marks 4 x 4-pixel cells of that frame, so a small
 * region's edge is often a pixel or two off; measured on its held-out scenes, snapping raises the IoU of
 * the first click's three candidates and of the ranked-first one, of the corrective clicks and of boxes (the
 * candidates' order by area falls a little; MODEL_CARD.md, "As the product shows its answers").
 *
 * trimask.edge_snap computes the same numbers for `trimask eval` (the tests compare the two):
 * - the guide: the image averaged down to the frame's valid newH x newW (torch's adaptive average
 *   pooling), colours in [0, 1]; its window means and the inverses of its regularized colour
 *   covariances depend on the image only, so they are computed once per image (`makeGuide`);
 * - per answer: the sigmoid of its logits, the per-window linear fit to the colours, the fits averaged
 *   (`coefficients`), then resized bilinearly to the output and applied to its colours: inside > 0.5.
 */
import { getPreprocessShape } from "./coordinates";
import type { ColumnMajorMask } from "./mask_postprocess";
import type { DecodeOutput } from "./session";
import type { Preview } from "./worker_protocol";

export const SNAP_LOW_RES = 256;
/** The window's half-width in cells of the 256 frame and the regularizer, chosen on training scenes. */
export const SNAP_RADIUS = 5;
export const SNAP_EPS = 1e-3;

/** An h x w image's colours in [0, 1], interleaved RGB row-major ([h * w * 3]). */
export interface Colours {
  h: number;
  w: number;
  rgb: Float64Array;
}

/**
 * `pixels` (h x w, `channels` bytes per pixel, row-major: RGBA from a canvas) averaged down to
 * outH x outW: each output the mean of the pixels in its bins [floor(i h / outH), ceil((i + 1) h / outH)).
 */
export function areaResize(pixels: ArrayLike<number>, h: number, w: number, channels: number, outH: number, outW: number): Colours {
  const cols = new Float64Array(h * outW * 3);
  for (let j = 0; j < outW; j++) {
    const x0 = Math.floor((j * w) / outW);
    const x1 = Math.ceil(((j + 1) * w) / outW);
    for (let y = 0; y < h; y++) {
      let r = 0, g = 0, b = 0;
      for (let x = x0; x < x1; x++) {
        const k = (y * w + x) * channels;
        r += pixels[k];
        g += pixels[k + 1];
        b += pixels[k + 2];
      }
      const o = (y * outW + j) * 3;
      const n = x1 - x0;
      cols[o] = r / n;
      cols[o + 1] = g / n;
      cols[o + 2] = b / n;
    }
  }
  const rgb = new Float64Array(outH * outW * 3);
  for (let i = 0; i < outH; i++) {
    const y0 = Math.floor((i * h) / outH);
    const y1 = Math.ceil(((i + 1) * h) / outH);
    const n = (y1 - y0) * 255;
    for (let y = y0; y < y1; y++) {
      const src = y * outW * 3;
      const dst = i * outW * 3;
      for (let k = 0; k < outW * 3; k++) rgb[dst + k] += cols[src + k];
    }
    for (let k = i * outW * 3; k < (i + 1) * outW * 3; k++) rgb[k] /= n;
  }
  return { h: outH, w: outW, rgb };
}

/** Means of `c`-channel interleaved h x w data over the (2r + 1)-square window of each pixel, clipped to the
 * array: sliding sums along rows, then down the columns (row by row, so memory is read in order; the
 * window's count is the product of the two clipped extents). */
export function boxMean(src: Float64Array, h: number, w: number, c: number, r: number): Float64Array {
  const rows = new Float64Array(h * w * c);
  const sum = new Float64Array(c);
  for (let y = 0; y < h; y++) {
    const base = y * w * c;
    sum.fill(0);
    for (let x = 0; x <= Math.min(r, w - 1); x++) for (let k = 0; k < c; k++) sum[k] += src[base + x * c + k];
    for (let x = 0; x < w; x++) {
      const n = Math.min(w, x + r + 1) - Math.max(0, x - r);
      for (let k = 0; k < c; k++) rows[base + x * c + k] = sum[k] / n;
      if (x + r + 1 < w) for (let k = 0; k < c; k++) sum[k] += src[base + (x + r + 1) * c + k];
      if (x - r >= 0) for (let k = 0; k < c; k++) sum[k] -= src[base + (x - r) * c + k];
    }
  }
  const out = new Float64Array(h * w * c);
  const line = w * c;
  const cols = new Float64Array(line);
  for (let y = 0; y <= Math.min(r, h - 1); y++) for (let i = 0; i < line; i++) cols[i] += rows[y * line + i];
  for (let y = 0; y < h; y++) {
    const n = Math.min(h, y + r + 1) - Math.max(0, y - r);
    const o = y * line;
    for (let i = 0; i < line; i++) out[o + i] = cols[i] / n;
    if (y + r + 1 < h) {
      const add = (y + r + 1) * line;
      for (let i = 0; i < line; i++) cols[i] += rows[add + i];
    }
    if (y - r >= 0) {
      const sub = (y - r) * line;
      for (let i = 0; i < line; i++) cols[i] -= rows[sub + i];
    }
  }
  return out;
}

/** What the filter needs of one image: its guide on the 256 frame's valid part and the guide's window statistics. */
export interface Guide {
  colours: Colours;
  /** Window means of the colours, [h * w * 3]. */
  mean: Float64Array;
  /** Inverses of the windows' colour covariances + eps I, [h * w * 9] row-major 3 x 3. */
  inverse: Float64Array;
}

/** The guide of an image given as `pixels` (imageH x imageW, `channels` bytes a pixel). */
export function makeGuide(pixels: ArrayLike<number>, imageH: number, imageW: number, channels = 4, r = SNAP_RADIUS, eps = SNAP_EPS): Guide {
  const [nh, nw] = getPreprocessShape(imageH, imageW, SNAP_LOW_RES);
  const colours = areaResize(pixels, imageH, imageW, channels, nh, nw);
  const n = nh * nw;
  const I = colours.rgb;
  const products = new Float64Array(n * 6); // rr rg rb gg gb bb
  for (let i = 0; i < n; i++) {
    const [r0, g0, b0] = [I[3 * i], I[3 * i + 1], I[3 * i + 2]];
    products.set([r0 * r0, r0 * g0, r0 * b0, g0 * g0, g0 * b0, b0 * b0], 6 * i);
  }
  const mean = boxMean(I, nh, nw, 3, r);
  const second = boxMean(products, nh, nw, 6, r);
  const inverse = new Float64Array(n * 9);
  for (let i = 0; i < n; i++) {
    const [mr, mg, mb] = [mean[3 * i], mean[3 * i + 1], mean[3 * i + 2]];
    const s = second.subarray(6 * i, 6 * i + 6);
    const a = s[0] - mr * mr + eps, b = s[1] - mr * mg, c = s[2] - mr * mb;
    const d = s[3] - mg * mg + eps, e = s[4] - mg * mb, f = s[5] - mb * mb + eps;
    // Inverse of the symmetric [[a b c] [b d e] [c e f]] by its cofactors.
    const A = d * f - e * e, B = c * e - b * f, C = b * e - c * d;
    const det = a * A + b * B + c * C;
    const D = a * f - c * c, E = b * c - a * e, F = a * d - b * b;
    inverse.set([A, B, C, B, D, E, C, E, F].map((v) => v / det), 9 * i);
  }
  return { colours, mean, inverse };
}

/** The averaged linear fits of one answer on the guide's grid: probability = a . colour + b, stored per
 * cell as a0 a1 a2 b. */
export interface Coefficients {
  h: number;
  w: number;
  ab: Float64Array;
}

/** The fits for one answer's logits: rows of `stride` values (256 for the decoder's frame), the first
 * guide-sized block read. */
export function coefficients(logits: Float32Array, stride: number, guide: Guide, r = SNAP_RADIUS): Coefficients {
  const { h, w, rgb: I } = guide.colours;
  const n = h * w;
  const pip = new Float64Array(n * 4); // p, p I
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      const v = 1 / (1 + Math.exp(-logits[y * stride + x]));
      pip[4 * i] = v;
      pip[4 * i + 1] = I[3 * i] * v;
      pip[4 * i + 2] = I[3 * i + 1] * v;
      pip[4 * i + 3] = I[3 * i + 2] * v;
    }
  }
  const means = boxMean(pip, h, w, 4, r);
  const ab = new Float64Array(n * 4); // a0 a1 a2 b
  const { mean, inverse: M } = guide;
  for (let i = 0; i < n; i++) {
    const mp = means[4 * i];
    const c0 = means[4 * i + 1] - mean[3 * i] * mp;
    const c1 = means[4 * i + 2] - mean[3 * i + 1] * mp;
    const c2 = means[4 * i + 3] - mean[3 * i + 2] * mp;
    const m = 9 * i;
    const a0 = M[m] * c0 + M[m + 1] * c1 + M[m + 2] * c2;
    const a1 = M[m + 3] * c0 + M[m + 4] * c1 + M[m + 5] * c2;
    const a2 = M[m + 6] * c0 + M[m + 7] * c1 + M[m + 8] * c2;
    ab[4 * i] = a0;
    ab[4 * i + 1] = a1;
    ab[4 * i + 2] = a2;
    ab[4 * i + 3] = mp - (a0 * mean[3 * i] + a1 * mean[3 * i + 1] + a2 * mean[3 * i + 2]);
  }
  return { h, w, ab: boxMean(ab, h, w, 4, r) };
}

/** Bilinear source indices and weights (align_corners=False) in float64, like trimask.edge_snap. */
function axis(inSize: number, outSize: number): { lo: Int32Array; hi: Int32Array; t: Float64Array } {
  const lo = new Int32Array(outSize);
  const hi = new Int32Array(outSize);
  const t = new Float64Array(outSize);
  for (let d = 0; d < outSize; d++) {
    const src = Math.max((d + 0.5) * (inSize / outSize) - 0.5, 0);
    lo[d] = Math.floor(src);
    hi[d] = Math.min(lo[d] + 1, inSize - 1);
    t[d] = src - lo[d];
  }
  return { lo, hi, t };
}

/**
 * Applies the fits at every pixel of an outH x outW output whose colours are `src` (row-major, `channels`
 * values a pixel, multiplied by `scale` to give 0-1 RGB) and marks the pixels inside (probability > 0.5)
 * in `out` (`value` at `offset` + row-major index, or column-major with `columnMajor`). Returns how many.
 */
function apply(coef: Coefficients, outH: number, outW: number, src: ArrayLike<number>, channels: number, scale: number,
  out: Uint8Array, offset: number, value: number, columnMajor: boolean): number {
  const ax = axis(coef.w, outW);
  const ay = axis(coef.h, outH);
  // A coefficient row (a0 a1 a2 b per output column) resized along x.
  const rowAt = (y: number, row: Float64Array): Float64Array => {
    const ab = coef.ab;
    for (let j = 0; j < outW; j++) {
      const l = 4 * (y * coef.w + ax.lo[j]);
      const r = 4 * (y * coef.w + ax.hi[j]);
      const t = ax.t[j], u = 1 - t;
      row[4 * j] = ab[l] * u + ab[r] * t;
      row[4 * j + 1] = ab[l + 1] * u + ab[r + 1] * t;
      row[4 * j + 2] = ab[l + 2] * u + ab[r + 2] * t;
      row[4 * j + 3] = ab[l + 3] * u + ab[r + 3] * t;
    }
    return row;
  };
  let topY = -1, bottomY = -1;
  let top = new Float64Array(outW * 4);
  let bottom = new Float64Array(outW * 4);
  let inside = 0;
  for (let i = 0; i < outH; i++) {
    const y0 = ay.lo[i], y1 = ay.hi[i];
    if (topY !== y0) {
      if (bottomY === y0) [top, bottom] = [bottom, top];
      else rowAt(y0, top);
      topY = y0;
      bottomY = -1;
    }
    if (bottomY !== y1) {
      rowAt(y1, bottom);
      bottomY = y1;
    }
    const t = ay.t[i], u = 1 - t;
    let k = i * outW * channels;
    for (let j = 0; j < outW; j++, k += channels) {
      const q =
        (top[4 * j] * u + bottom[4 * j] * t) * src[k] * scale +
        (top[4 * j + 1] * u + bottom[4 * j + 1] * t) * src[k + 1] * scale +
        (top[4 * j + 2] * u + bottom[4 * j + 2] * t) * src[k + 2] * scale +
        (top[4 * j + 3] * u + bottom[4 * j + 3] * t);
      if (q > 0.5) {
        out[offset + (columnMajor ? j * outH + i : i * outW + j)] = value;
        inside++;
      }
    }
  }
  return inside;
}

/** One answer snapped at the output `colours` (e.g. the display's size): a row-major 0/255 mask written
 * into `out` at `offset`; returns how many pixels are inside. */
export function snapInto(coef: Coefficients, colours: Colours, out: Uint8Array, offset = 0): number {
  out.fill(0, offset, offset + colours.h * colours.w);
  return apply(coef, colours.h, colours.w, colours.rgb, 3, 1, out, offset, 255, false);
}

/** One answer snapped at the full image (`pixels`, height x width, `channels` bytes a pixel): a column-major
 * mask, as SAM's postprocessing gives it unsnapped (mask_postprocess.ts). */
export function snapFull(coef: Coefficients, pixels: ArrayLike<number>, height: number, width: number, channels = 4): ColumnMajorMask {
  const data = new Uint8Array(height * width);
  apply(coef, height, width, pixels, channels, 1 / 255, data, 0, 1, true);
  return { height, width, data };
}

/** The long side of the decoder's display masks (trimask.export.onnx_decoder). */
export const DISPLAY_LONG_SIDE = 512;

/** What the page keeps of the open image to snap its answers: the guide and the display masks' colours. */
export interface ImageSnap {
  imageId: number;
  guide: Guide;
  display: Colours;
}

/** The open image's snap data from its pixels (height x width RGBA). */
export function imageSnap(imageId: number, pixels: ArrayLike<number>, height: number, width: number): ImageSnap {
  const [dh, dw] = getPreprocessShape(height, width, DISPLAY_LONG_SIDE).map((v) => Math.max(1, v));
  return { imageId, guide: makeGuide(pixels, height, width), display: areaResize(pixels, height, width, 4, dh, dw) };
}

/** A decode's output with the display masks of `tokens` (those the page shows: 1-3 for a single click, 0
 * otherwise) snapped and their areas measured again; the low-res logits stay as the decoder gave them (they
 * go back as the next click's mask input). Unchanged when the display's size is not the one `snap` was made for. */
export function snapOutput<T extends DecodeOutput>(out: T, snap: ImageSnap, tokens = [0, 1, 2, 3]): T {
  const { displayH: h, displayW: w } = out;
  if (h !== snap.display.h || w !== snap.display.w) return out;
  const display = out.display.slice();
  const areas = out.areas.slice();
  const frame = SNAP_LOW_RES * SNAP_LOW_RES;
  for (const t of tokens) {
    const coef = coefficients(out.lowRes.subarray(t * frame, (t + 1) * frame), SNAP_LOW_RES, snap.guide);
    areas[t] = snapInto(coef, snap.display, display, t * h * w) / (h * w);
  }
  return { ...out, display, areas };
}

/** A hover preview with its mask snapped (unchanged when its display is not the size `snap` was made for). */
export function snapPreview<P extends Preview>(preview: P, snap: ImageSnap): P {
  if (preview.displayH !== snap.display.h || preview.displayW !== snap.display.w) return preview;
  const display = new Uint8Array(preview.display.length);
  snapInto(coefficients(preview.lowRes, preview.lowResW, snap.guide), snap.display, display);
  return { ...preview, display };
}
