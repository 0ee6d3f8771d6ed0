import { describe, expect, it } from "vitest";
import {
  areaResize,
  boxMean,
  coefficients,
  imageSnap,
  makeGuide,
  snapFull,
  snapInto,
  snapOutput,
  snapPreview,
  SNAP_LOW_RES,
} from "../src/edge_snap";
import { postprocessLowRes } from "../src/mask_postprocess";
import type { DecodeOutput } from "../src/session";
import { columnMajorBits, f32, reference } from "./fixtures";

const FRAME = SNAP_LOW_RES * SNAP_LOW_RES;

/** An RGB byte image -> RGBA, as a canvas gives it. */
function rgba(rgb: Uint8Array): Uint8ClampedArray {
  const out = new Uint8ClampedArray((rgb.length / 3) * 4);
  for (let i = 0; i < rgb.length / 3; i++) out.set([rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2], 255], 4 * i);
  return out;
}

const differing = (a: Uint8Array, b: Uint8Array) => a.reduce((n, v, i) => n + ((v ? 1 : 0) !== (b[i] ? 1 : 0) ? 1 : 0), 0);
const count = (a: Uint8Array) => a.reduce((n, v) => n + (v ? 1 : 0), 0);

/** An h x w image split at column `edge` into two flat colours, as RGBA. */
function twoColours(h: number, w: number, edge: number): Uint8ClampedArray {
  const out = new Uint8ClampedArray(h * w * 4);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) out.set(x < edge ? [200, 40, 40, 255] : [30, 90, 210, 255], 4 * (y * w + x));
  }
  return out;
}

/** Logits over the 256 frame of an h x w image, positive left of image column `edge`. */
function leftOf(h: number, w: number, edge: number): Float32Array {
  const scale = SNAP_LOW_RES / Math.max(h, w);
  const logits = new Float32Array(FRAME);
  for (let i = 0; i < FRAME; i++) logits[i] = (edge * scale - (i % SNAP_LOW_RES) - 0.5) * 2;
  return logits;
}

describe("snapped edges", () => {
  it("gives trimask.edge_snap's masks at full resolution and at the display's size", () => {
    const s = reference.snap;
    const pixels = rgba(new Uint8Array(Buffer.from(s.image, "base64")));
    const low = f32(reference.postprocess.low_res);
    const guide = makeGuide(pixels, s.h, s.w);
    expect([guide.colours.h, guide.colours.w]).toEqual([192, 256]);
    const coef = coefficients(low, SNAP_LOW_RES, guide);

    const full = snapFull(coef, pixels, s.h, s.w);
    const expected = columnMajorBits(s.full, s.h, s.w);
    expect(differing(full.data, expected)).toBeLessThanOrEqual(2); // float64 on both sides; ties at 0.5 aside
    expect(Math.abs(count(full.data) - s.full_area)).toBeLessThanOrEqual(2);
    // Snapping changed the mask: it is not SAM's postprocessing of the same logits.
    expect(count(postprocessLowRes(low, s.h, s.w).data)).toBe(s.unsnapped_area);
    expect(Math.abs(s.full_area - s.unsnapped_area)).toBeGreaterThan(20);

    const display = new Uint8Array(s.dh * s.dw);
    const inside = snapInto(coef, areaResize(pixels, s.h, s.w, 4, s.dh, s.dw), display);
    const bits = columnMajorBits(s.display, s.dh, s.dw); // column-major: compare transposed
    const row = new Uint8Array(s.dh * s.dw);
    for (let x = 0; x < s.dw; x++) for (let y = 0; y < s.dh; y++) row[y * s.dw + x] = bits[x * s.dh + y];
    expect(differing(display, row)).toBeLessThanOrEqual(4);
    expect(Math.abs(inside - s.display_area)).toBeLessThanOrEqual(4);
    expect(new Set(display)).toEqual(new Set([0, 255]));
  });

  it("moves an edge a few pixels off onto the image's colour edge", () => {
    const [h, w] = [300, 640]; // 2.5 image pixels a frame cell
    const pixels = twoColours(h, w, 320);
    const edgeAt = (decoderEdge: number, y: number) => {
      const full = snapFull(coefficients(leftOf(h, w, decoderEdge), SNAP_LOW_RES, makeGuide(pixels, h, w)), pixels, h, w);
      return Array.from({ length: w }, (_, x) => full.data[x * h + y]).indexOf(0);
    };
    for (const y of [0, 117, h - 1]) {
      expect(edgeAt(316, y)).toBe(320); // 4 pixels inside
      expect(edgeAt(322, y)).toBe(320); // 2 pixels outside
      expect(edgeAt(300, y)).toBe(300); // 8 cells of the frame away: beyond the windows, kept
    }
    const unsnapped = postprocessLowRes(leftOf(h, w, 316), h, w);
    expect(Array.from({ length: w }, (_, x) => unsnapped.data[x * h]).indexOf(0)).toBe(316);
    // A flat image has no edge to snap to: the mask keeps the decoder's edge (within a pixel).
    const flat = new Uint8ClampedArray(h * w * 4).fill(128);
    const kept = snapFull(coefficients(leftOf(h, w, 316), SNAP_LOW_RES, makeGuide(flat, h, w)), flat, h, w);
    expect(Math.abs(count(kept.data) - count(unsnapped.data))).toBeLessThanOrEqual(h);
  });

  it("averages windows clipped at the border and areas of any ratio", () => {
    const [h, w, c, r] = [7, 9, 2, 2];
    const src = Float64Array.from({ length: h * w * c }, (_, i) => Math.sin(i * 1.7) * 3);
    const out = boxMean(src, h, w, c, r);
    for (const [y, x] of [[0, 0], [3, 4], [6, 8], [1, 7]]) {
      for (let k = 0; k < c; k++) {
        let s = 0, n = 0;
        for (let yy = Math.max(0, y - r); yy <= Math.min(h - 1, y + r); yy++) {
          for (let xx = Math.max(0, x - r); xx <= Math.min(w - 1, x + r); xx++, n++) s += src[(yy * w + xx) * c + k];
        }
        expect(out[(y * w + x) * c + k]).toBeCloseTo(s / n, 12);
      }
    }
    // 4 x 6 -> 2 x 3 is a mean over 2 x 2 blocks; 4 x 6 -> 3 x 4 over overlapping bins.
    const px = Uint8Array.from({ length: 4 * 6 * 3 }, (_, i) => (i * 37) % 256);
    const half = areaResize(px, 4, 6, 3, 2, 3);
    const at = (y: number, x: number, k: number) => px[(y * 6 + x) * 3 + k];
    expect(half.rgb[(1 * 3 + 2) * 3 + 1]).toBeCloseTo((at(2, 4, 1) + at(2, 5, 1) + at(3, 4, 1) + at(3, 5, 1)) / 4 / 255, 12);
    const odd = areaResize(px, 4, 6, 3, 3, 4); // row bin 1 = rows [1, 3), column bin 1 = columns [1, 3)
    expect(odd.rgb[(1 * 4 + 1) * 3]).toBeCloseTo((at(1, 1, 0) + at(1, 2, 0) + at(2, 1, 0) + at(2, 2, 0)) / 4 / 255, 12);
  });

  it("snaps every token of a decode and its preview, measuring areas again and keeping the logits", () => {
    const [h, w] = [400, 200]; // tall: the guide is 256 x 128 of the frame
    const pixels = twoColours(h, w, 100);
    const snap = imageSnap(7, pixels, h, w);
    expect([snap.guide.colours.h, snap.guide.colours.w, snap.display.h, snap.display.w]).toEqual([256, 128, 512, 256]);
    const lowRes = new Float32Array(4 * FRAME);
    [40, 97, 120, 180].forEach((edge, t) => lowRes.set(leftOf(h, w, edge), t * FRAME));
    const [dh, dw] = [snap.display.h, snap.display.w];
    const out = {
      iou: new Float32Array(4), areas: new Float32Array([0.1, 0.2, 0.3, 0.4]), display: new Uint8Array(4 * dh * dw),
      displayH: dh, displayW: dw, lowRes,
    } as DecodeOutput;
    const snapped = snapOutput(out, snap);
    expect(snapped.lowRes).toBe(lowRes);
    // Token 1's edge (97) is 3 pixels from the colour edge and snaps to it: half the image.
    expect(snapped.areas[1]).toBeCloseTo(0.5, 5);
    for (let t = 0; t < 4; t++) expect(snapped.areas[t]).toBeCloseTo(count(snapped.display.subarray(t * dh * dw, (t + 1) * dh * dw)) / (dh * dw), 6);
    expect(snapOutput({ ...out, displayH: dh - 1 }, snap).display).toBe(out.display); // another size: unchanged
    const shown = snapOutput(out, snap, [1, 2, 3]); // the tokens a click shows: token 0 left as it was
    expect(Buffer.from(shown.display).equals(Buffer.from(snapped.display.map((v, i) => (i < dh * dw ? 0 : v))))).toBe(true);
    expect(shown.areas[0]).toBe(out.areas[0]);

    // The hover graph's logits are a crop of the frame (rows of 132 here): the same answer as the full frame's.
    const whole = leftOf(h, w, 97);
    const cropped = new Float32Array(SNAP_LOW_RES * 132);
    for (let y = 0; y < SNAP_LOW_RES; y++) cropped.set(whole.subarray(y * SNAP_LOW_RES, y * SNAP_LOW_RES + 132), y * 132);
    const preview = { token: 1, iou: out.iou, display: new Uint8Array(dh * dw), displayH: dh, displayW: dw, lowRes: cropped, lowResW: 132 };
    const p = snapPreview(preview, snap);
    expect(Buffer.from(p.display).equals(Buffer.from(snapped.display.subarray(dh * dw, 2 * dh * dw)))).toBe(true);
  });
});
