/**
 * The annotation session of one image as one plain object, changed only by the
 * pure functions below (each returns a new state; nothing here touches the
 * DOM, the network or the decoder). The view draws a state; the controller
 * turns user input into these calls and carries out the returned effects.
 */
import type { Annotation, AnnotationBody, Category, ImageInfo, Level, Prompt } from "./types";

export const LOW_RES_PIXELS = 256 * 256;
export const MAX_UNDO = 100;

/** One decoder run's outputs for a prompt (all four mask tokens). */
export interface DecodeOutput {
  /** Predicted IoU per token, [4]. */
  iou: Float32Array;
  /** Fraction of the image each token's mask covers, [4]. */
  areas: Float32Array;
  /** 0/255 masks over the image's valid region, [4 x displayH x displayW] row-major. */
  display: Uint8Array;
  displayH: number;
  displayW: number;
  /** Low-resolution logits, [4 x 256 x 256] row-major. */
  lowRes: Float32Array;
}

/** One selectable mask: a decoder token with its label by area. */
export interface Candidate {
  level: Level;
  token: number;
  iou: number;
  area: number;
}

/** A prompt plus the low-res logits that refine it (SAM's mask_input), if any. */
export interface PromptStep extends Prompt {
  /** [256 x 256] logits of the candidate chosen before this step, or null. */
  maskInput: Float32Array | null;
}

/** What the prompt panel shows at one moment: restored as a whole by undo/redo. */
export interface PromptSnapshot {
  prompt: PromptStep;
  result: DecodeOutput | null;
  chosen: number;
}

export type UndoEntry =
  | { kind: "prompt"; snapshot: PromptSnapshot }
  | { kind: "save"; annotation: Annotation; snapshot: PromptSnapshot }
  | { kind: "delete"; annotation: Annotation }
  | { kind: "relabel"; id: number; from: number; to: number };

/** I/O the controller must carry out after an undo/redo or an object edit. */
export type Effect =
  | { type: "decode" }
  | { type: "delete"; id: number }
  | { type: "create"; tempId: number; body: AnnotationBody }
  | { type: "update"; id: number; category_id: number };

export interface SessionState {
  image: ImageInfo | null;
  prompt: PromptStep;
  /** Bumped on every prompt change; decode results for older versions are dropped. */
  promptVersion: number;
  result: DecodeOutput | null;
  candidates: Candidate[];
  /** Index into candidates, -1 when there is none. */
  chosen: number;
  objects: Annotation[];
  hidden: number[];
  selectedObject: number | null;
  categories: Category[];
  currentCategory: number | null;
  undo: UndoEntry[];
  redo: UndoEntry[];
}

export const EMPTY_PROMPT: PromptStep = { points: [], labels: [], box: null, maskInput: null };

export function createSession(categories: Category[] = [], currentCategory: number | null = null): SessionState {
  return {
    image: null,
    prompt: EMPTY_PROMPT,
    promptVersion: 0,
    result: null,
    candidates: [],
    chosen: -1,
    objects: [],
    hidden: [],
    selectedObject: null,
    categories,
    currentCategory: currentCategory ?? categories[0]?.id ?? null,
    undo: [],
    redo: [],
  };
}

/** A fresh session for another image, keeping the categories and the last category. */
export function openImage(state: SessionState, image: ImageInfo, objects: Annotation[]): SessionState {
  return { ...createSession(state.categories, state.currentCategory), image, objects, promptVersion: state.promptVersion + 1 };
}

export function isPromptEmpty(p: Prompt): boolean {
  return p.points.length === 0 && p.box === null;
}

/** SAM's three candidates for a lone point; its single-mask output (token 0) otherwise. */
export function isMultimask(p: Prompt): boolean {
  return p.points.length === 1 && p.box === null;
}

/**
 * Candidates for a decode: tokens 1..3 labelled subpart < part < whole by area
 * (ties keep token order), or token 0 alone as "single".
 */
export function candidatesFor(result: DecodeOutput, multimask: boolean): Candidate[] {
  if (!multimask) return [{ level: "single", token: 0, iou: result.iou[0], area: result.areas[0] }];
  const tokens = [1, 2, 3].sort((a, b) => result.areas[a] - result.areas[b] || a - b);
  const levels: Level[] = ["subpart", "part", "whole"];
  return tokens.map((token, i) => ({ level: levels[i], token, iou: result.iou[token], area: result.areas[token] }));
}

/** Index of the candidate with the highest predicted IoU (the preselected one). */
export function bestCandidate(candidates: Candidate[]): number {
  let best = -1;
  candidates.forEach((c, i) => {
    if (best < 0 || c.iou > candidates[best].iou) best = i;
  });
  return best;
}

function snapshot(state: SessionState): PromptSnapshot {
  return { prompt: state.prompt, result: state.result, chosen: state.chosen };
}

function pushUndo(state: SessionState, entry: UndoEntry): UndoEntry[] {
  return [...state.undo, entry].slice(-MAX_UNDO);
}

/** The chosen candidate's low-res logits (copy), the mask_input for the next refinement. */
export function chosenLogits(state: SessionState): Float32Array | null {
  const c = state.candidates[state.chosen];
  if (!state.result || !c) return null;
  return state.result.lowRes.slice(c.token * LOW_RES_PIXELS, (c.token + 1) * LOW_RES_PIXELS);
}

function withPrompt(state: SessionState, prompt: PromptStep): SessionState {
  return {
    ...state,
    prompt,
    promptVersion: state.promptVersion + 1,
    result: null,
    candidates: [],
    chosen: -1,
    undo: pushUndo(state, { kind: "prompt", snapshot: snapshot(state) }),
    redo: [],
  };
}

/** Adds a point (label 1 foreground, 0 background); refines the chosen candidate if there is one. */
export function addPoint(state: SessionState, x: number, y: number, label: 0 | 1): SessionState {
  const p = state.prompt;
  return withPrompt(state, {
    points: [...p.points, [x, y]],
    labels: [...p.labels, label],
    box: p.box,
    maskInput: chosenLogits(state),
  });
}

/** Sets the box (corners in any order); keeps the points, and refines only when there are points. */
export function setBox(state: SessionState, x0: number, y0: number, x1: number, y1: number): SessionState {
  const p = state.prompt;
  const box: [number, number, number, number] = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  return withPrompt(state, {
    points: p.points,
    labels: p.labels,
    box,
    maskInput: p.points.length > 0 ? chosenLogits(state) : null,
  });
}

/** Escape: drops the prompt and its candidates (undoable). */
export function clearPrompt(state: SessionState): SessionState {
  if (isPromptEmpty(state.prompt)) return state;
  return withPrompt(state, EMPTY_PROMPT);
}

/** Stores a decode result if it belongs to the current prompt; preselects the best candidate. */
export function applyResult(state: SessionState, version: number, result: DecodeOutput): SessionState {
  if (version !== state.promptVersion || isPromptEmpty(state.prompt)) return state;
  const candidates = candidatesFor(result, isMultimask(state.prompt));
  return { ...state, result, candidates, chosen: bestCandidate(candidates) };
}

/** Chooses a candidate by level (keys 1/2/3) or index; unknown levels leave the state as it is. */
export function chooseLevel(state: SessionState, level: Level): SessionState {
  const i = state.candidates.findIndex((c) => c.level === level);
  return i < 0 ? state : { ...state, chosen: i };
}

export function chooseIndex(state: SessionState, index: number): SessionState {
  return index >= 0 && index < state.candidates.length ? { ...state, chosen: index } : state;
}

export function chosenCandidate(state: SessionState): Candidate | null {
  return state.candidates[state.chosen] ?? null;
}

/** The annotation body to save for the chosen candidate, given its encoded segmentation. */
export function annotationBody(state: SessionState, segmentation: AnnotationBody["segmentation"]): AnnotationBody | null {
  const c = chosenCandidate(state);
  if (!c || state.currentCategory === null) return null;
  const { points, labels, box } = state.prompt;
  return { category_id: state.currentCategory, segmentation, score: c.iou, level: c.level, prompt: { points, labels, box } };
}

/**
 * The service stored an object: list it, clear the prompt; undo deletes it and brings the prompt
 * back. `from` is the state the save started from; if the prompt changed while the request was
 * out, the new prompt stays and undo brings back the saved one.
 */
export function objectSaved(state: SessionState, annotation: Annotation, from: SessionState = state): SessionState {
  if (from.promptVersion !== state.promptVersion) {
    return {
      ...state,
      objects: [...state.objects, annotation],
      undo: pushUndo(state, { kind: "save", annotation, snapshot: snapshot(from) }),
      redo: [],
    };
  }
  return {
    ...state,
    objects: [...state.objects, annotation],
    prompt: EMPTY_PROMPT,
    promptVersion: state.promptVersion + 1,
    result: null,
    candidates: [],
    chosen: -1,
    undo: pushUndo(state, { kind: "save", annotation, snapshot: snapshot(state) }),
    redo: [],
  };
}

/** Deletes a saved object (undoable); the controller deletes it on the server. */
export function deleteObject(state: SessionState, id: number): [SessionState, Effect[]] {
  const annotation = state.objects.find((o) => o.id === id);
  if (!annotation) return [state, []];
  return [
    {
      ...state,
      objects: state.objects.filter((o) => o.id !== id),
      hidden: state.hidden.filter((h) => h !== id),
      selectedObject: state.selectedObject === id ? null : state.selectedObject,
      undo: pushUndo(state, { kind: "delete", annotation }),
      redo: [],
    },
    [{ type: "delete", id }],
  ];
}

/** Gives a saved object another category (undoable). */
export function relabelObject(state: SessionState, id: number, categoryId: number): [SessionState, Effect[]] {
  const o = state.objects.find((a) => a.id === id);
  if (!o || o.category_id === categoryId) return [state, []];
  return [
    {
      ...state,
      objects: state.objects.map((a) => (a.id === id ? { ...a, category_id: categoryId } : a)),
      undo: pushUndo(state, { kind: "relabel", id, from: o.category_id, to: categoryId }),
      redo: [],
    },
    [{ type: "update", id, category_id: categoryId }],
  ];
}

export function toggleHidden(state: SessionState, id: number): SessionState {
  const hidden = state.hidden.includes(id) ? state.hidden.filter((h) => h !== id) : [...state.hidden, id];
  return { ...state, hidden };
}

export function selectObject(state: SessionState, id: number | null): SessionState {
  return { ...state, selectedObject: state.selectedObject === id ? null : id };
}

export function addCategory(state: SessionState, category: Category): SessionState {
  const categories = state.categories.some((c) => c.id === category.id)
    ? state.categories.map((c) => (c.id === category.id ? category : c))
    : [...state.categories, category];
  return { ...state, categories, currentCategory: category.id };
}

export function setCurrentCategory(state: SessionState, id: number): SessionState {
  return state.categories.some((c) => c.id === id) ? { ...state, currentCategory: id } : state;
}

/** The service answered an update: keep its copy (new version) of the object. */
export function objectUpdated(state: SessionState, saved: Annotation): SessionState {
  return { ...state, objects: state.objects.map((o) => (o.id === saved.id ? saved : o)) };
}

function bodyOf(a: Annotation): AnnotationBody {
  return { category_id: a.category_id, segmentation: a.segmentation, score: a.score, level: a.level, prompt: a.prompt };
}

function restorePrompt(state: SessionState, s: PromptSnapshot): SessionState {
  const multimask = isMultimask(s.prompt);
  return {
    ...state,
    prompt: s.prompt,
    promptVersion: state.promptVersion + 1,
    result: s.result,
    candidates: s.result ? candidatesFor(s.result, multimask) : [],
    chosen: s.result ? s.chosen : -1,
  };
}

/** Inverse of one undo entry applied to `state`: the new state, the entry for the other stack, effects. */
function invert(state: SessionState, entry: UndoEntry, redoing: boolean): [SessionState, UndoEntry, Effect[]] {
  switch (entry.kind) {
    case "prompt": {
      const next = restorePrompt(state, entry.snapshot);
      const needsDecode = !next.result && !isPromptEmpty(next.prompt);
      return [next, { kind: "prompt", snapshot: snapshot(state) }, needsDecode ? [{ type: "decode" }] : []];
    }
    case "save": {
      const a = entry.annotation;
      if (!redoing) {
        // Undo a save: the object goes away and its prompt comes back to be refined.
        const next = restorePrompt({ ...state, objects: state.objects.filter((o) => o.id !== a.id) }, entry.snapshot);
        const effects: Effect[] = [{ type: "delete", id: a.id }];
        if (!next.result && !isPromptEmpty(next.prompt)) effects.push({ type: "decode" });
        return [next, entry, effects];
      }
      const next = restorePrompt({ ...state, objects: [...state.objects, a] }, { prompt: EMPTY_PROMPT, result: null, chosen: -1 });
      return [next, { ...entry, snapshot: snapshot(state) }, [{ type: "create", tempId: a.id, body: bodyOf(a) }]];
    }
    case "delete": {
      const a = entry.annotation;
      if (!redoing) {
        return [{ ...state, objects: [...state.objects, a] }, entry, [{ type: "create", tempId: a.id, body: bodyOf(a) }]];
      }
      return [{ ...state, objects: state.objects.filter((o) => o.id !== a.id) }, entry, [{ type: "delete", id: a.id }]];
    }
    case "relabel": {
      const to = redoing ? entry.to : entry.from;
      const objects = state.objects.map((o) => (o.id === entry.id ? { ...o, category_id: to } : o));
      return [{ ...state, objects }, entry, [{ type: "update", id: entry.id, category_id: to }]];
    }
  }
}

/** Ctrl+Z: undoes the last prompt change or object edit. */
export function undo(state: SessionState): [SessionState, Effect[]] {
  const entry = state.undo[state.undo.length - 1];
  if (!entry) return [state, []];
  const base = { ...state, undo: state.undo.slice(0, -1) };
  const [next, inverse, effects] = invert(base, entry, false);
  return [{ ...next, redo: [...state.redo, inverse] }, effects];
}

/** Ctrl+Shift+Z: redoes the last undone change. */
export function redo(state: SessionState): [SessionState, Effect[]] {
  const entry = state.redo[state.redo.length - 1];
  if (!entry) return [state, []];
  const base = { ...state, redo: state.redo.slice(0, -1) };
  const [next, inverse, effects] = invert(base, entry, true);
  return [{ ...next, undo: pushUndo(next, inverse) }, effects];
}

/** After a "create" effect the service gives the object a new id: use it everywhere, history included. */
export function replaceObjectId(state: SessionState, tempId: number, saved: Annotation): SessionState {
  const swap = (a: Annotation) => (a.id === tempId ? saved : a);
  const swapEntry = (e: UndoEntry): UndoEntry => {
    if ((e.kind === "save" || e.kind === "delete") && e.annotation.id === tempId) return { ...e, annotation: saved };
    if (e.kind === "relabel" && e.id === tempId) return { ...e, id: saved.id };
    return e;
  };
  return {
    ...state,
    objects: state.objects.map(swap),
    hidden: state.hidden.map((h) => (h === tempId ? saved.id : h)),
    selectedObject: state.selectedObject === tempId ? saved.id : state.selectedObject,
    undo: state.undo.map(swapEntry),
    redo: state.redo.map(swapEntry),
  };
}
