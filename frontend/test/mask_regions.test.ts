import { describe, expect, it } from "vitest";
import { keepClickedRegions, keepClickedRegionsFull, keepPreviewRegion, keepRegionsAt } from "../src/mask_regions";
import { columnMajorBits, reference } from "./fixtures";

/** np.packbits of a row-major h x w mask -> row-major 0/1. */
function rowMajorBits(b64: string, h: number, w: number): Uint8Array {
  const bytes = Buffer.from(b64, "base64");
  const out = new Uint8Array(h * w);
  for (let i = 0; i < h * w; i++) out[i] = (bytes[i >> 3] >> (7 - (i & 7))) & 1;
  return out;
}

const sum = (a: Uint8Array) => a.reduce((s, v) => s + (v ? 1 : 0), 0);

interface RegionsCase {
  h: number;
  w: number;
  points: [number, number][];
  bits: string;
  kept: string;
  area: number;
}

describe("clicked regions", () => {
  it("keeps what trimask eval keeps (row-major display masks and column-major saved masks)", () => {
    const cases = reference.regions as RegionsCase[];
    expect(cases.length).toBeGreaterThan(5);
    for (const c of cases) {
      const row = rowMajorBits(c.bits, c.h, c.w);
      const seeds = c.points.map(([x, y]): [number, number] => [Math.floor(x), Math.floor(y)]);
      const kept = keepRegionsAt(row, 0, c.w, c.h, seeds);
      expect(Buffer.from(row).equals(Buffer.from(rowMajorBits(c.kept, c.h, c.w)))).toBe(true);
      expect(sum(row)).toBe(c.area);
      expect(kept === -1 ? sum(rowMajorBits(c.bits, c.h, c.w)) : kept).toBe(c.area);

      const full = { height: c.h, width: c.w, data: columnMajorBits(c.bits, c.h, c.w) };
      keepClickedRegionsFull(full, c.points);
      expect(Buffer.from(full.data).equals(Buffer.from(columnMajorBits(c.kept, c.h, c.w)))).toBe(true);
    }
  });

  it("joins diagonal neighbours and leaves a mask no seed lies on as it is", () => {
    // 0 1 0 0 1
    // 1 0 0 0 1
    // 0 0 0 0 0
    const mask = new Uint8Array([0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    const a = mask.slice();
    expect(keepRegionsAt(a, 0, 5, 3, [[0, 1]])).toBe(2);
    expect(Array.from(a)).toEqual([0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    const b = mask.slice();
    expect(keepRegionsAt(b, 0, 5, 3, [[2, 2], [9, 0], [-1, 0]])).toBe(-1);
    expect(Array.from(b)).toEqual(Array.from(mask));
    const c = mask.slice();
    expect(keepRegionsAt(c, 0, 5, 3, [[4, 0], [1, 0]])).toBe(4);
    expect(Array.from(c)).toEqual(Array.from(mask));
  });

  it("cuts each token's display mask on its own and measures its area again", () => {
    // Two tokens on a 2 x 4 display over a 4 x 8 image: token 0 has two regions, token 1 one.
    const display = new Uint8Array([255, 0, 0, 255, 255, 0, 0, 255, 0, 0, 255, 255, 0, 0, 255, 255]);
    const out = {
      iou: new Float32Array([0.5, 0.6]),
      areas: new Float32Array([0.5, 0.5]),
      display,
      displayH: 2,
      displayW: 4,
      lowRes: new Float32Array([1, 2]),
      decodeMs: 3,
    };
    const cut = keepClickedRegions(out, [[1.5, 3.9]], 4, 8); // image (x 1.5, y 3.9) -> display cell (0, 1)
    expect(Array.from(cut.display.subarray(0, 8))).toEqual([255, 0, 0, 0, 255, 0, 0, 0]);
    expect(Array.from(cut.display.subarray(8))).toEqual(Array.from(display.subarray(8))); // no click on token 1
    expect(Array.from(cut.areas)).toEqual([0.25, 0.5]);
    expect(cut.lowRes).toBe(out.lowRes);
    expect(cut.decodeMs).toBe(3);
    expect(Array.from(out.display)).toEqual(Array.from(display)); // the decoder's output is left as it was
    expect(keepClickedRegions(out, [], 4, 8)).toBe(out);

    const preview = { token: 1, iou: out.iou, display: display.slice(0, 8), displayH: 2, displayW: 4, lowRes: new Float32Array(0), lowResW: 0 };
    expect(Array.from(keepPreviewRegion(preview, 7.2, 0.5, 4, 8).display)).toEqual([0, 0, 0, 255, 0, 0, 0, 255]);
  });
});
