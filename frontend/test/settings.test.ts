import { describe, expect, it } from "vitest";
import { clickedRegionsFor, readSettings, snapEdgesFor } from "../src/settings";

describe("page settings", () => {
  it("uses every core when cross-origin isolated, one thread otherwise", () => {
    expect(readSettings("", 4, true).numThreads).toBe(4);
    expect(readSettings("?threads=2", 4, true).numThreads).toBe(2);
    expect(readSettings("?threads=8", 4, true).numThreads).toBe(4);
    expect(readSettings("?threads=2", 4, false).numThreads).toBe(1);
  });

  it("has hover previews and two one-thread workers unless the URL turns them off", () => {
    expect(readSettings("", 2, true)).toMatchObject({ hover: true, oneThreadWorkers: 2 });
    expect(readSettings("?hoverpair=0", 2, true)).toMatchObject({ hover: true, oneThreadWorkers: 1 });
    expect(readSettings("?secondworker=0", 2, true)).toMatchObject({ hover: true, oneThreadWorkers: 0 });
    expect(readSettings("?hover=0", 2, true).hover).toBe(false);
  });

  it("takes hover previews from the hover graph unless the URL says hovergraph=0", () => {
    expect(readSettings("", 2, true).hoverGraph).toBe(true);
    expect(readSettings("?hovergraph=0", 2, true)).toMatchObject({ hover: true, hoverGraph: false });
  });
});

describe("clicked regions setting", () => {
  it("follows the model unless the URL says regions=clicked or regions=all", () => {
    expect(readSettings("", 2, true).clickedRegions).toBeNull();
    expect(readSettings("?regions=clicked", 2, true).clickedRegions).toBe(true);
    expect(readSettings("?regions=all", 2, true).clickedRegions).toBe(false);
    expect(readSettings("?regions=nonsense", 2, true).clickedRegions).toBeNull();
    expect(clickedRegionsFor("tiny")).toBe(true);
    expect(clickedRegionsFor("vit_b")).toBe(false);
    expect(clickedRegionsFor(undefined)).toBe(false);
    expect(readSettings("", 2, true).snapEdges).toBeNull();
    expect(readSettings("?edges=snap", 2, true).snapEdges).toBe(true);
    expect(readSettings("?edges=off", 2, true).snapEdges).toBe(false);
    expect(readSettings("?edges=1", 2, true).snapEdges).toBeNull();
    expect(readSettings("?regions=all&edges=off", 2, true)).toMatchObject({ clickedRegions: false, snapEdges: false });
    expect(snapEdgesFor("tiny")).toBe(true);
    expect(snapEdgesFor("vit_h")).toBe(false);
    expect(snapEdgesFor(null)).toBe(false);
  });
});
