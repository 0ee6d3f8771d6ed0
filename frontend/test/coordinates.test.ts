import { describe, expect, it } from "vitest";
import { clientToImage, getPreprocessShape, IDENTITY_VIEW, imageToClient, imageToFrame, panBy, zoomAt } from "../src/coordinates";

const stage = { left: 100, top: 50, width: 400, height: 300 };

describe("coordinates", () => {
  it("resizes the longest side to 1024 with SAM's rounding", () => {
    expect(getPreprocessShape(1536, 1024)).toEqual([1024, 683]);
    expect(getPreprocessShape(3000, 4000)).toEqual([768, 1024]);
    expect(getPreprocessShape(768, 1024)).toEqual([768, 1024]);
  });

  it("maps client to image pixels at zoom 1 as (clientX - left) * naturalWidth / width", () => {
    expect(clientToImage(300, 200, stage, IDENTITY_VIEW, 800, 600)).toEqual([400, 300]);
  });

  it("keeps the point under the cursor fixed when zooming", () => {
    const before = clientToImage(250, 120, stage, IDENTITY_VIEW, 800, 600);
    const view = zoomAt(IDENTITY_VIEW, 150, 70, 3, stage);
    expect(view.zoom).toBe(3);
    const after = clientToImage(250, 120, stage, view, 800, 600);
    expect(after[0]).toBeCloseTo(before[0], 9);
    expect(after[1]).toBeCloseTo(before[1], 9);
  });

  it("inverts clientToImage under zoom and pan", () => {
    const view = panBy(zoomAt(IDENTITY_VIEW, 10, 10, 4, stage), -37, -12, stage);
    const [cx, cy] = imageToClient(123.5, 456.25, stage, view, 800, 600);
    const [x, y] = clientToImage(cx, cy, stage, view, 800, 600);
    expect(x).toBeCloseTo(123.5, 9);
    expect(y).toBeCloseTo(456.25, 9);
  });

  it("never pans the image away from the stage edges", () => {
    expect(panBy(IDENTITY_VIEW, 50, 50, stage)).toEqual(IDENTITY_VIEW);
    const z = zoomAt(IDENTITY_VIEW, 0, 0, 2, stage);
    expect(panBy(z, -10_000, 0, stage).panX).toBe(-400);
  });

  it("scales image pixels into the 1024 frame per axis", () => {
    const [x, y] = imageToFrame(1024, 768, 1536, 1024);
    expect(x).toBeCloseTo((1024 * 683) / 1024, 9);
    expect(y).toBeCloseTo(768 * (1024 / 1536), 9);
  });
});
