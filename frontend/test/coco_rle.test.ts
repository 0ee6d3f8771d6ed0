import { describe, expect, it } from "vitest";
import { countsToString, decodeRle, encodeMask, maskToCounts, rleArea, stringToCounts } from "../src/coco_rle";
import { columnMajorBits, reference } from "./fixtures";

describe("COCO RLE", () => {
  for (const c of reference.rle) {
    it(`encodes the ${c.name} mask to the same string as pycocotools`, () => {
      const data = columnMajorBits(c.bits, c.h, c.w);
      const rle = encodeMask({ height: c.h, width: c.w, data });
      expect(rle.size).toEqual([c.h, c.w]);
      expect(rle.counts).toBe(c.counts);
      expect(rleArea(rle)).toBe(c.area);
    });

    it(`decodes pycocotools' string for the ${c.name} mask back to the same pixels`, () => {
      const decoded = decodeRle({ size: [c.h, c.w], counts: c.counts });
      expect(Buffer.from(decoded.data).equals(Buffer.from(columnMajorBits(c.bits, c.h, c.w)))).toBe(true);
    });
  }

  it("starts with a run of zeros even when the first pixel is set", () => {
    expect(maskToCounts(new Uint8Array([1, 1, 0]))).toEqual([0, 2, 1]);
  });

  it("round-trips counts with negative differences and runs past 2^20", () => {
    const counts = [3, 2_000_000, 1, 5, 1_500_000, 0, 7, 40_000_000];
    expect(stringToCounts(countsToString(counts))).toEqual(counts);
  });

  it("decodes uncompressed list counts too", () => {
    const m = decodeRle({ size: [2, 2], counts: [1, 2, 1] });
    expect(Array.from(m.data)).toEqual([0, 1, 1, 0]);
  });
});
