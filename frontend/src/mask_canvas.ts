/** Masks to canvases: the decoder's display masks and saved objects' RLE, tinted with a colour. */
import type { ColumnMajorMask } from "./mask_postprocess";

export type Rgb = [number, number, number];

export function hexToRgb(hex: string): Rgb {
  const m = /^#?([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex.trim());
  return m ? [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)] : [255, 127, 14];
}

/** One token of a [T x H x W] 0/255 display mask as a tinted, half-transparent canvas. */
export function displayMaskCanvas(display: Uint8Array, token: number, h: number, w: number, rgb: Rgb, alpha = 140): HTMLCanvasElement {
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d")!;
  const img = ctx.createImageData(w, h);
  const px = new Uint32Array(img.data.buffer);
  // ImageData is RGBA in memory; on little-endian machines that is ABGR as a Uint32.
  const colour = ((alpha << 24) | (rgb[2] << 16) | (rgb[1] << 8) | rgb[0]) >>> 0;
  const base = token * h * w;
  for (let i = 0; i < h * w; i++) if (display[base + i]) px[i] = colour;
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

/** Paints 0/1 masks in their colours over one ImageData (later masks on top). */
export function paintMasks(img: ImageData, masks: { data: Uint8Array; rgb: Rgb; alpha: number }[]): void {
  const px = new Uint32Array(img.data.buffer);
  px.fill(0);
  for (const m of masks) {
    const colour = ((m.alpha << 24) | (m.rgb[2] << 16) | (m.rgb[1] << 8) | m.rgb[0]) >>> 0;
    for (let i = 0; i < m.data.length; i++) if (m.data[i]) px[i] = colour;
  }
}
