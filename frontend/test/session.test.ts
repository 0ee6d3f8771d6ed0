import { describe, expect, it } from "vitest";
import {
  addCategory,
  addPoint,
  annotationBody,
  applyResult,
  candidatesFor,
  chooseLevel,
  chosenCandidate,
  clearPrompt,
  createSession,
  deleteObject,
  EMPTY_PROMPT,
  LOW_RES_PIXELS,
  objectSaved,
  openImage,
  redo,
  relabelObject,
  replaceObjectId,
  setBox,
  toggleHidden,
  undo,
  type DecodeOutput,
  type SessionState,
} from "../src/session";
import type { Annotation, ImageInfo } from "../src/types";

const image: ImageInfo = { id: 7, file_name: "a.png", width: 40, height: 30, num_annotations: 0 };

/** A decode output whose token t has area areas[t], IoU ious[t] and low-res logits all equal to t. */
function output(areas: number[], ious: number[]): DecodeOutput {
  const lowRes = new Float32Array(4 * LOW_RES_PIXELS);
  for (let t = 0; t < 4; t++) lowRes.fill(t, t * LOW_RES_PIXELS, (t + 1) * LOW_RES_PIXELS);
  return {
    iou: new Float32Array(ious),
    areas: new Float32Array(areas),
    display: new Uint8Array(4 * 2 * 2),
    displayH: 2,
    displayW: 2,
    lowRes,
  };
}

function started(): SessionState {
  let s = createSession([{ id: 1, name: "cat" }]);
  s = openImage(s, image, []);
  return s;
}

function annotation(id: number, categoryId = 1): Annotation {
  return {
    id,
    image_id: 7,
    category_id: categoryId,
    segmentation: { size: [30, 40], counts: "0" },
    score: 0.9,
    level: "part",
    prompt: { points: [[1, 2]], labels: [1], box: null },
    area: 10,
    bbox: [0, 0, 1, 1],
  };
}

describe("candidates", () => {
  it("labels the three multimask tokens subpart < part < whole by area", () => {
    const c = candidatesFor(output([0.5, 0.3, 0.05, 0.6], [0.1, 0.8, 0.7, 0.9]), true);
    expect(c.map((x) => [x.level, x.token])).toEqual([
      ["subpart", 2],
      ["part", 1],
      ["whole", 3],
    ]);
  });

  it("preselects the candidate with the highest predicted IoU after a click", () => {
    let s = addPoint(started(), 5, 5, 1);
    s = applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
    expect(chosenCandidate(s)?.token).toBe(1);
    expect(chosenCandidate(s)?.level).toBe("part");
  });

  it("uses the single-mask output (token 0) once there are two points", () => {
    let s = addPoint(started(), 5, 5, 1);
    s = applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
    s = addPoint(s, 9, 9, 0);
    s = applyResult(s, s.promptVersion, output([0.4, 0.3, 0.05, 0.6], [0.8, 0.95, 0.7, 0.9]));
    expect(s.candidates.map((c) => [c.level, c.token])).toEqual([["single", 0]]);
  });

  it("drops a result computed for an older prompt", () => {
    let s = addPoint(started(), 5, 5, 1);
    const old = s.promptVersion;
    s = addPoint(s, 6, 6, 1);
    expect(applyResult(s, old, output([0, 0, 0, 0], [0, 0, 0, 0]))).toBe(s);
  });

  it("chooses by level with keys 1/2/3", () => {
    let s = addPoint(started(), 5, 5, 1);
    s = applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
    expect(chosenCandidate(chooseLevel(s, "whole"))?.token).toBe(3);
    expect(chosenCandidate(chooseLevel(s, "subpart"))?.token).toBe(2);
  });
});

describe("prompts", () => {
  it("refines the chosen candidate: its low-res logits become the next mask_input", () => {
    let s = addPoint(started(), 5, 5, 1);
    s = applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
    s = chooseLevel(s, "whole");
    s = addPoint(s, 8, 8, 0);
    expect(s.prompt.points).toEqual([
      [5, 5],
      [8, 8],
    ]);
    expect(s.prompt.labels).toEqual([1, 0]);
    expect(s.prompt.maskInput?.length).toBe(LOW_RES_PIXELS);
    expect(s.prompt.maskInput?.every((v) => v === 3)).toBe(true);
  });

  it("the first click has no mask_input", () => {
    expect(addPoint(started(), 1, 1, 1).prompt.maskInput).toBeNull();
  });

  it("normalises a box dragged in any direction and decodes it alone without mask_input", () => {
    const s = setBox(started(), 30, 20, 10, 5);
    expect(s.prompt.box).toEqual([10, 5, 30, 20]);
    expect(s.prompt.maskInput).toBeNull();
  });

  it("Escape clears the prompt and candidates; undo brings both back", () => {
    let s = addPoint(started(), 5, 5, 1);
    s = applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
    const cleared = clearPrompt(s);
    expect(cleared.prompt).toEqual(EMPTY_PROMPT);
    expect(cleared.candidates).toEqual([]);
    const [back, effects] = undo(cleared);
    expect(back.prompt.points).toEqual([[5, 5]]);
    expect(back.candidates.length).toBe(3);
    expect(effects).toEqual([]);
  });

  it("undo and redo walk through the points one at a time", () => {
    let s = addPoint(started(), 1, 1, 1);
    s = addPoint(s, 2, 2, 0);
    s = addPoint(s, 3, 3, 1);
    [s] = undo(s);
    expect(s.prompt.points.length).toBe(2);
    [s] = undo(s);
    expect(s.prompt.points.length).toBe(1);
    [s] = redo(s);
    [s] = redo(s);
    expect(s.prompt.points).toEqual([
      [1, 1],
      [2, 2],
      [3, 3],
    ]);
    const [same] = redo(s);
    expect(same).toBe(s);
  });

  it("asks for a decode when undo restores a prompt whose result never arrived", () => {
    let s = addPoint(started(), 1, 1, 1);
    s = addPoint(s, 2, 2, 1);
    const [, effects] = undo(s);
    expect(effects).toEqual([{ type: "decode" }]);
  });

  it("a new prompt change clears the redo stack", () => {
    let s = addPoint(started(), 1, 1, 1);
    s = addPoint(s, 2, 2, 1);
    [s] = undo(s);
    s = addPoint(s, 4, 4, 1);
    expect(s.redo).toEqual([]);
  });
});

describe("saved objects", () => {
  function withCandidates(): SessionState {
    let s = addPoint(started(), 5, 5, 1);
    return applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
  }

  it("builds the annotation body from the chosen candidate, category and prompt", () => {
    const s = chooseLevel(withCandidates(), "whole");
    const body = annotationBody(s, { size: [30, 40], counts: "x" });
    expect(body).toMatchObject({ category_id: 1, level: "whole", prompt: { points: [[5, 5]], labels: [1], box: null } });
    expect(body?.score).toBeCloseTo(0.9, 6);
  });

  it("saving lists the object and clears the prompt; undo deletes it and restores the prompt; redo re-creates it", () => {
    let s = objectSaved(withCandidates(), annotation(11));
    expect(s.objects.map((o) => o.id)).toEqual([11]);
    expect(s.prompt).toEqual(EMPTY_PROMPT);
    let effects;
    [s, effects] = undo(s);
    expect(s.objects).toEqual([]);
    expect(s.prompt.points).toEqual([[5, 5]]);
    expect(s.candidates.length).toBe(3);
    expect(effects).toEqual([{ type: "delete", id: 11 }]);
    [s, effects] = redo(s);
    expect(s.objects.map((o) => o.id)).toEqual([11]);
    expect(s.prompt).toEqual(EMPTY_PROMPT);
    expect(effects[0]).toMatchObject({ type: "create", tempId: 11, body: { category_id: 1, level: "part" } });
    s = replaceObjectId(s, 11, annotation(12));
    expect(s.objects.map((o) => o.id)).toEqual([12]);
    [s, effects] = undo(s);
    expect(effects).toEqual([{ type: "delete", id: 12 }]);
  });

  it("deleting is undoable and undo re-creates the same object", () => {
    let s = objectSaved(withCandidates(), annotation(11));
    let effects;
    [s, effects] = deleteObject(s, 11);
    expect(s.objects).toEqual([]);
    expect(effects).toEqual([{ type: "delete", id: 11 }]);
    [s, effects] = undo(s);
    expect(s.objects.map((o) => o.id)).toEqual([11]);
    expect(effects[0]).toMatchObject({ type: "create", tempId: 11 });
  });

  it("relabelling changes the category and undo changes it back", () => {
    let s = addCategory(objectSaved(withCandidates(), annotation(11)), { id: 2, name: "dog" });
    let effects;
    [s, effects] = relabelObject(s, 11, 2);
    expect(s.objects[0].category_id).toBe(2);
    expect(effects).toEqual([{ type: "update", id: 11, category_id: 2 }]);
    [s, effects] = undo(s);
    expect(s.objects[0].category_id).toBe(1);
    expect(effects).toEqual([{ type: "update", id: 11, category_id: 1 }]);
  });

  it("hiding toggles per object", () => {
    let s = objectSaved(withCandidates(), annotation(11));
    s = toggleHidden(s, 11);
    expect(s.hidden).toEqual([11]);
    expect(toggleHidden(s, 11).hidden).toEqual([]);
  });
});

describe("categories", () => {
  it("a created category becomes the current one and the next image keeps it", () => {
    let s = addCategory(started(), { id: 5, name: "wheel", color: "#00ff00" });
    expect(s.currentCategory).toBe(5);
    s = openImage(s, { ...image, id: 8 }, []);
    expect(s.currentCategory).toBe(5);
    expect(s.categories.map((c) => c.id)).toEqual([1, 5]);
  });

  it("opening another image starts with an empty prompt and history", () => {
    let s = addPoint(started(), 1, 1, 1);
    s = openImage(s, { ...image, id: 8 }, [annotation(3)]);
    expect(s.prompt).toEqual(EMPTY_PROMPT);
    expect(s.undo).toEqual([]);
    expect(s.objects.map((o) => o.id)).toEqual([3]);
  });
});

describe("saving while the prompt changes", () => {
  it("keeps a prompt started during the save and still makes the save undoable", () => {
    let s = addPoint(started(), 5, 5, 1);
    s = applyResult(s, s.promptVersion, output([0.5, 0.3, 0.05, 0.6], [0.1, 0.95, 0.7, 0.9]));
    const from = s;
    s = clearPrompt(s);
    s = addPoint(s, 20, 20, 1);
    s = objectSaved(s, annotation(11), from);
    expect(s.objects.map((o) => o.id)).toEqual([11]);
    expect(s.prompt.points).toEqual([[20, 20]]);
    const [after, effects] = undo(s);
    expect(effects[0]).toEqual({ type: "delete", id: 11 });
    expect(after.prompt.points).toEqual([[5, 5]]);
  });
});
