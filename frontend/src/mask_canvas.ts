/** Masks to canvases: the decoder's display masks and saved objects' RLE, tinted with a colour. */
import type { ColumnMajorMask } from "./mask_postprocess";

export type Rgb = [number, number, number];

export function hexToRgb(hex: string): Rgb {
  const m = /^#?([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex.trim());
  return m ? [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)] : [255, 127, 14];
}

/** An RGBA pixel as one little-endian Uint32 (ImageData's memory order is R, G, B, A). */
function rgba(rgb: Rgb, alpha: number): number {
  return ((alpha << 24) | (rgb[2] << 16) | (rgb[1] << 8) | rgb[0]) >>> 0;
}

/**
 * Paints the pixels where mask[offset + i] is non-zero: the inside at `fillAlpha`, the
 * boundary (a 4-neighbour outside the mask or the image) opaque, so shapes stay legible.
 */
export function tintMask(px: Uint32Array, mask: Uint8Array, offset: number, w: number, h: number, rgb: Rgb, fillAlpha: number): void {
  const fill = rgba(rgb, fillAlpha);
  const edge = rgba(rgb, 255);
  for (let y = 0; y < h; y++) {
    const row = offset + y * w;
    for (let x = 0; x < w; x++) {
      if (!mask[row + x]) continue;
      const onEdge =
        x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !mask[row + x - 1] || !mask[row + x + 1] || !mask[row + x - w] || !mask[row + x + w];
      px[y * w + x] = onEdge ? edge : fill;
    }
  }
}

/** One token of a [T x H x W] 0/255 display mask as a tinted canvas with an opaque outline. */
export function displayMaskCanvas(display: Uint8Array, token: number, h: number, w: number, rgb: Rgb, alpha = 140): HTMLCanvasElement {
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d")!;
  const img = ctx.createImageData(w, h);
  tintMask(new Uint32Array(img.data.buffer), display, token * h * w, w, h, rgb, alpha);
  ctx.putImageData(img, 0, 0);
  return canvas;
}

/** Nearest-neighbour sample of a full-resolution column-major mask onto an h x w grid (row-major 0/1). */
export function sampleMask(mask: ColumnMajorMask, h: number, w: number): Uint8Array {
  const out = new Uint8Array(h * w);
  const xs = new Int32Array(w);
  for (let x = 0; x < w; x++) xs[x] = Math.min(mask.width - 1, Math.floor(((x + 0.5) * mask.width) / w)) * mask.height;
  for (let y = 0; y < h; y++) {
    const sy = Math.min(mask.height - 1, Math.floor(((y + 0.5) * mask.height) / h));
    for (let x = 0; x < w; x++) out[y * w + x] = mask.data[xs[x] + sy];
  }
  return out;
}

/** Paints 0/1 masks of size w x h in their colours over one ImageData (later masks on top). */
export function paintMasks(img: ImageData, masks: { data: Uint8Array; rgb: Rgb; alpha: number }[]): void {
  const px = new Uint32Array(img.data.buffer);
  px.fill(0);
  for (const m of masks) tintMask(px, m.data, 0, img.width, img.height, m.rgb, m.alpha);
}
