import { describe, expect, it } from "vitest";
import { encodeMask } from "../src/coco_rle";
import { axisWeights, bilinearResize, postprocessLowRes } from "../src/mask_postprocess";
import { f32, reference } from "./fixtures";

describe("bilinear resize", () => {
  const { h, w, src, resized } = reference.bilinear;
  for (const r of resized) {
    it(`matches torch F.interpolate(bilinear, align_corners=False) for ${h}x${w} -> ${r.h}x${r.w}`, () => {
      const got = bilinearResize(f32(src), h, w, r.h, r.w);
      const want = f32(r.values);
      expect(got.length).toBe(want.length);
      for (let i = 0; i < want.length; i++) expect(got[i]).toBeCloseTo(want[i], 5);
    });
  }

  it("clamps source positions at the borders like torch", () => {
    const a = axisWeights(4, 8);
    expect(a.i0[0]).toBe(0);
    expect(a.w1[0]).toBe(0);
    expect(a.i1[7]).toBe(3);
  });

  it("crops to the first keepH x keepW outputs", () => {
    const src = new Float32Array([1, 2, 3, 4]);
    const full = bilinearResize(src, 2, 2, 6, 6);
    const crop = bilinearResize(src, 2, 2, 6, 6, 3, 4);
    for (let y = 0; y < 3; y++) for (let x = 0; x < 4; x++) expect(crop[y * 4 + x]).toBe(full[y * 6 + x]);
  });
});

describe("SAM mask postprocessing", () => {
  const lowRes = f32(reference.postprocess.low_res);
  for (const c of reference.postprocess.cases) {
    it(`gives the same ${c.h}x${c.w} mask as SAM's postprocess_masks in torch`, () => {
      const mask = postprocessLowRes(lowRes, c.h, c.w);
      const rle = encodeMask(mask);
      expect(mask.data.reduce((s, v) => s + v, 0)).toBe(c.area);
      expect(rle.counts).toBe(c.counts);
    });
  }
});
