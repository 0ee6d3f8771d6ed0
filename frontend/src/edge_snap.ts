/**
 * "Snap edges": an answer's edges moved onto the image's colour edges by a guided filter (He, Sun and
 * Tang), fitted on the decoder's 256 x 256 frame and applied at the output's own pixels (the subsampled
 * "fast guided filter"). The embedded tiny model marks 4 x 4-pixel cells of that frame, so a small
 * region's edge is often a pixel or two off; measured on its held-out scenes, snapping raises every
 * number of the first click and of the corrective clicks (MODEL_CARD.md, "Snapped edges").
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

/** Means of `c`-channel interleaved h x w data over the (2r + 1)-square window of each pixel, clipped to the array. */
export function boxMean(src: Float64Array, h: number, w: number, c: number, r: number): Float64Array {
  const W = w + 1;
  const sums = new Float64Array((h + 1) * W * c);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const o = ((y + 1) * W + x + 1) * c;
      const left = ((y + 1) * W + x) * c;
      const up = (y * W + x + 1) * c;
      const diag = (y * W + x) * c;
      const s = (y * w + x) * c;
      for (let k = 0; k < c; k++) sums[o + k] = src[s + k] + sums[left + k] + sums[up + k] - sums[diag + k];
    }
  }
  const out = new Float64Array(h * w * c);
  for (let y = 0; y < h; y++) {
    const y0 = Math.max(0, y - r);
    const y1 = Math.min(h, y + r + 1);
    for (let x = 0; x < w; x++) {
      const x0 = Math.max(0, x - r);
      const x1 = Math.min(w, x + r + 1);
      const n = (y1 - y0) * (x1 - x0);
      const a = (y1 * W + x1) * c, b = (y0 * W + x1) * c, d = (y1 * W + x0) * c, e = (y0 * W + x0) * c;
      const o = (y * w + x) * c;
      for (let k = 0; k < c; k++) out[o + k] = (sums[a + k] - sums[b + k] - sums[d + k] + sums[e + k]) / n;
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

/** The averaged linear fits of one answer on the guide's grid: probability = a . colour + b. */
export interface Coefficients {
  h: number;
  w: number;
  a: Float64Array;
  b: Float64Array;
}

/** The fits for one answer's logits: rows of `stride` values (256 for the decoder's frame), the first
 * guide-sized block read. */
export function coefficients(logits: Float32Array, stride: number, guide: Guide, r = SNAP_RADIUS): Coefficients {
  const { h, w, rgb: I } = guide.colours;
  const n = h * w;
  const p = new Float64Array(n);
  const ip = new Float64Array(n * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      const v = 1 / (1 + Math.exp(-logits[y * stride + x]));
      p[i] = v;
      ip[3 * i] = I[3 * i] * v;
      ip[3 * i + 1] = I[3 * i + 1] * v;
      ip[3 * i + 2] = I[3 * i + 2] * v;
    }
  }
  const meanP = boxMean(p, h, w, 1, r);
  const meanIp = boxMean(ip, h, w, 3, r);
  const a = new Float64Array(n * 3);
  const b = new Float64Array(n);
  const { mean, inverse: M } = guide;
  for (let i = 0; i < n; i++) {
    const c0 = meanIp[3 * i] - mean[3 * i] * meanP[i];
    const c1 = meanIp[3 * i + 1] - mean[3 * i + 1] * meanP[i];
    const c2 = meanIp[3 * i + 2] - mean[3 * i + 2] * meanP[i];
    const m = 9 * i;
    const a0 = M[m] * c0 + M[m + 1] * c1 + M[m + 2] * c2;
    const a1 = M[m + 3] * c0 + M[m + 4] * c1 + M[m + 5] * c2;
    const a2 = M[m + 6] * c0 + M[m + 7] * c1 + M[m + 8] * c2;
    a[3 * i] = a0;
    a[3 * i + 1] = a1;
    a[3 * i + 2] = a2;
    b[i] = meanP[i] - (a0 * mean[3 * i] + a1 * mean[3 * i + 1] + a2 * mean[3 * i + 2]);
  }
  return { h, w, a: boxMean(a, h, w, 3, r), b: boxMean(b, h, w, 1, r) };
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
 * Applies the fits at every pixel of an outH x outW output whose colours `colour(i, j, out)` writes
 * (0-1, RGB) and calls `set(i, j)` for each pixel inside (probability > 0.5). Returns how many were inside.
 */
function apply(coef: Coefficients, outH: number, outW: number, colour: (i: number, j: number, out: Float64Array) => void,
  set: (i: number, j: number) => void): number {
  const ax = axis(coef.w, outW);
  const ay = axis(coef.h, outH);
  // Rows of the four coefficient maps resized along x, for the two source rows an output row reads.
  const rowAt = (y: number): Float64Array => {
    const row = new Float64Array(outW * 4);
    for (let j = 0; j < outW; j++) {
      const l = y * coef.w + ax.lo[j];
      const r = y * coef.w + ax.hi[j];
      const t = ax.t[j];
      for (let k = 0; k < 3; k++) row[4 * j + k] = coef.a[3 * l + k] * (1 - t) + coef.a[3 * r + k] * t;
      row[4 * j + 3] = coef.b[l] * (1 - t) + coef.b[r] * t;
    }
    return row;
  };
  const cache = new Map<number, Float64Array>();
  const rgb = new Float64Array(3);
  let inside = 0;
  for (let i = 0; i < outH; i++) {
    for (const y of cache.keys()) if (y < ay.lo[i]) cache.delete(y);
    const top = cache.get(ay.lo[i]) ?? rowAt(ay.lo[i]);
    cache.set(ay.lo[i], top);
    const bottom = cache.get(ay.hi[i]) ?? rowAt(ay.hi[i]);
    cache.set(ay.hi[i], bottom);
    const t = ay.t[i];
    for (let j = 0; j < outW; j++) {
      colour(i, j, rgb);
      let q = 0;
      for (let k = 0; k < 4; k++) {
        const v = top[4 * j + k] * (1 - t) + bottom[4 * j + k] * t;
        q += k < 3 ? v * rgb[k] : v;
      }
      if (q > 0.5) {
        set(i, j);
        inside++;
      }
    }
  }
  return inside;
}

/** One answer snapped at the output `colours` (e.g. the display's size): a row-major 0/255 mask written
 * into `out` at `offset`; returns how many pixels are inside. */
export function snapInto(coef: Coefficients, colours: Colours, out: Uint8Array, offset = 0): number {
  const { h, w, rgb } = colours;
  out.fill(0, offset, offset + h * w);
  return apply(coef, h, w, (i, j, c) => {
    const k = 3 * (i * w + j);
    c[0] = rgb[k];
    c[1] = rgb[k + 1];
    c[2] = rgb[k + 2];
  }, (i, j) => (out[offset + i * w + j] = 255));
}

/** One answer snapped at the full image (`pixels`, height x width, `channels` bytes a pixel): a column-major
 * mask, as SAM's postprocessing gives it unsnapped (mask_postprocess.ts). */
export function snapFull(coef: Coefficients, pixels: ArrayLike<number>, height: number, width: number, channels = 4): ColumnMajorMask {
  const data = new Uint8Array(height * width);
  apply(coef, height, width, (i, j, c) => {
    const k = (i * width + j) * channels;
    c[0] = pixels[k] / 255;
    c[1] = pixels[k + 1] / 255;
    c[2] = pixels[k + 2] / 255;
  }, (i, j) => (data[j * height + i] = 1));
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

/** A decode's output with every token's display mask snapped (areas measured again on them); the low-res
 * logits stay as the decoder gave them (they go back as the next click's mask input). Unchanged when the
 * display's size is not the one `snap` was made for. */
export function snapOutput<T extends DecodeOutput>(out: T, snap: ImageSnap): T {
  const { displayH: h, displayW: w } = out;
  if (h !== snap.display.h || w !== snap.display.w) return out;
  const display = new Uint8Array(out.display.length);
  const areas = out.areas.slice();
  const frame = SNAP_LOW_RES * SNAP_LOW_RES;
  for (let t = 0; t < areas.length; t++) {
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
