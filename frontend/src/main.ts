/**
 * The controller: turns pointer and key input into session functions, carries
 * out their effects (decoder, HTTP) and asks the view to draw the new state.
 */
import { api, ApiError } from "./api";
import { clientToImage, IDENTITY_VIEW, imageToFrame, panBy, zoomAt, type ViewTransform } from "./coordinates";
import { DecoderClient, type DecodeJob, type DecodeKind, type PreviewResult } from "./decoder_client";
import { MaskEncoder } from "./mask_encoder";
import {
  addCategory,
  addPoint,
  annotationBody,
  applyResult,
  chooseIndex,
  chooseLevel,
  chosenCandidate,
  clearPrompt,
  createSession,
  deleteObject,
  isMultimask,
  isPromptEmpty,
  LOW_RES_PIXELS,
  objectSaved,
  objectUpdated,
  openImage,
  redo,
  relabelObject,
  replaceObjectId,
  selectObject,
  setBox,
  setCurrentCategory,
  toggleHidden,
  undo,
  type DecodeOutput,
  type Effect,
  type PromptStep,
  type SessionState,
} from "./session";
import { imageSnap, snapOutput, snapPreview, type ImageSnap } from "./edge_snap";
import { keepClickedRegions, keepPreviewRegion } from "./mask_regions";
import { clickedRegionsFor, readSettings, snapEdgesFor } from "./settings";
import { installTimings } from "./timings";
import type { Category, ImageInfo } from "./types";
import { View } from "./view";
import { encodePromptInputs } from "./worker_protocol";

const DRAG_THRESHOLD_PX = 4;
const LAST_CATEGORY_KEY = "trimask.lastCategory";

const settings = readSettings(location.search, navigator.hardwareConcurrency, self.crossOriginIsolated);
const timings = installTimings();
const view = new View();

let state: SessionState = createSession();
let images: ImageInfo[] = [];
let imageIndex = -1;
let viewTransform: ViewTransform = IDENTITY_VIEW;
let openToken = 0;
let embeddingReady = false;
let decoderReady = false;
let saving = false;
/** The latest hover preview and where (image px) it was asked for. */
let hoverPreview: { preview: PreviewResult; imageId: number; x: number; y: number } | null = null;

/** Created in start(), once the server's status says which decoder graphs it has. */
let decoder: DecoderClient;
/** Whether answers to clicks keep only their regions that hold a positive click (settings.ts); set in start(). */
let clickedRegions = false;
/** "Snap edges" (edge_snap.ts): on, and the open image's data for it once its pixels are read. */
let snapEdges = false;
let snapData: ImageSnap | null = null;
const maskEncoder = new MaskEncoder();

/**
 * The decoder worker. The optional fast path (decoder_prepare/decoder_prepared) is used when the
 * server lists it in /api/status "decoder_parts" or the URL says ?fast=1 (and never with ?fast=0).
 */
function createDecoder(status: Record<string, unknown> | null): DecoderClient {
  const parts = Array.isArray(status?.decoder_parts) ? (status.decoder_parts as unknown[]) : [];
  const fast = settings.fastPath ?? (parts.includes("prepare") && parts.includes("prepared"));
  const client = new DecoderClient({
    modelUrl: settings.decoderUrl ?? api.decoderUrl(settings.quantized),
    fastPath:
      fast && !settings.decoderUrl
        ? {
            prepareUrl: api.decoderUrl(false, "prepare"),
            preparedUrl: api.decoderUrl(settings.quantized, "prepared"),
            // Hover previews compute only the mask they show (decoder_hover.onnx), when the server has it.
            hoverUrl: settings.hoverGraph && parts.includes("hover") ? api.decoderUrl(settings.quantized, "hover") : null,
          }
        : null,
    backend: settings.backend,
    numThreads: settings.numThreads,
    wasmPaths: "/ort/",
    style: settings.style,
    // With two or more threads, one-thread workers beside the main one: they preview hovers side by
    // side, and take clicks while one is the faster (see decoder_client.ts).
    oneThreadWorkers: settings.backend === "wasm" && settings.numThreads >= 2 ? settings.oneThreadWorkers : 0,
  });
  client.onFatal = (message) => view.showError(`The decoder could not run: ${message}`);
  client.onBusy = (running) => (timings.busy = running);
  return client;
}

function setState(next: SessionState): void {
  state = next;
  draw();
}

function draw(): void {
  view.draw(state, { hover: hoverPreview?.preview ?? null, view: viewTransform, ready: isReady() });
  // For tests and scripts: the image point whose hover preview is showing.
  if (hoverPreview) view.stage.dataset.hoverPoint = `${hoverPreview.x},${hoverPreview.y}`;
  else delete view.stage.dataset.hoverPoint;
}

function isReady(): boolean {
  return embeddingReady && decoderReady && state.image !== null;
}

function reportError(e: unknown): void {
  const message = e instanceof ApiError || e instanceof Error ? e.message : String(e);
  view.showError(message);
}

// ---------------------------------------------------------------- images

function updateNavigation(): void {
  const done = images.filter((im) => im.num_annotations > 0).length;
  view.setNavigation(imageIndex, images.length, state.image?.file_name ?? "", done);
}

async function openImageAt(index: number): Promise<void> {
  if (index < 0 || index >= images.length) return;
  const token = ++openToken;
  const t0 = performance.now();
  imageIndex = index;
  const image = images[index];
  embeddingReady = false;
  snapData = null;
  hoverPreview = null;
  decoder.cancelHover();
  viewTransform = IDENTITY_VIEW;
  history.replaceState(null, "", withImageParam(image.id));
  setState(openImage(state, image, []));
  view.setLoading("Computing the image embedding…");
  view.setImage(image);
  updateNavigation();
  try {
    const [objects, embedding] = await Promise.all([api.annotations(image.id), api.embedding(image.id), view.imageLoaded()]);
    if (token !== openToken) return;
    if (snapEdges) readPixels(image);
    setState(openImage(state, image, objects));
    view.setLoading("Loading the decoder…");
    await decoder.ready();
    if (token !== openToken) return;
    await decoder.setEmbedding(image.id, embedding.fp16);
    if (token !== openToken) return;
    embeddingReady = true;
    timings.open.push(performance.now() - t0);
    view.clearError();
    draw();
  } catch (e) {
    if (token !== openToken) return;
    view.setLoading("This image could not be loaded.");
    reportError(e);
  }
}

function withImageParam(id: number): string {
  const q = new URLSearchParams(location.search);
  q.set("image", String(id));
  return `${location.pathname}?${q.toString()}`;
}

// ---------------------------------------------------------------- decoding

/** A decoder job for a prompt on an image: points and box into SAM's 1024 frame. */
function decodeJob<K extends DecodeKind>(kind: K, image: ImageInfo, prompt: PromptStep): DecodeJob & { kind: K } {
  const toFrame = ([x, y]: [number, number]) => imageToFrame(x, y, image.height, image.width);
  let box: [number, number, number, number] | null = null;
  if (prompt.box) {
    const [x0, y0] = toFrame([prompt.box[0], prompt.box[1]]);
    const [x1, y1] = toFrame([prompt.box[2], prompt.box[3]]);
    box = [x0, y0, x1, y1];
  }
  const inputs = encodePromptInputs(prompt.points.map(toFrame), prompt.labels, box);
  return { kind, imageId: image.id, ...inputs, maskInput: prompt.maskInput, origHw: [image.height, image.width] };
}

/** Reads the open image's pixels for "snap edges": the snap data here, the pixels to the mask worker. */
function readPixels(image: ImageInfo): void {
  const pixels = view.imagePixels(image.height, image.width);
  if (!pixels) {
    console.warn(`trimask: the pixels of ${image.file_name} could not be read; its edges are not snapped`);
    return;
  }
  snapData = imageSnap(image.id, pixels, image.height, image.width);
  maskEncoder.setImage(image.id, pixels, image.height, image.width, snapData.guide);
}

/** The open image's snap data when "snap edges" is on and it is for `image`. */
function snapFor(image: ImageInfo): ImageSnap | null {
  return snapData?.imageId === image.id ? snapData : null;
}

/** A decode's output as the page shows it: snapped to the image's edges, then cut to its clicked regions
 * (each when its setting is on). */
function shown<T extends DecodeOutput>(raw: T, prompt: PromptStep, image: ImageInfo): T {
  const snap = snapFor(image);
  const snapped = snap ? snapOutput(raw, snap, isMultimask(prompt) ? [1, 2, 3] : [0]) : raw;
  return clickedRegions ? keepClickedRegions(snapped, positiveClicks(prompt), image.height, image.width) : snapped;
}

/** The prompt's positive clicks (image pixels), which the "clicked regions" setting keeps the regions of. */
function positiveClicks(prompt: PromptStep): [number, number][] {
  return prompt.points.filter((_, i) => prompt.labels[i] === 1);
}

/** Decodes the current prompt; the result is kept only if the prompt has not changed meanwhile. */
async function decodePrompt(t0: number): Promise<void> {
  if (!isReady() || isPromptEmpty(state.prompt)) return;
  const version = state.promptVersion;
  try {
    const image = state.image!;
    const prompt = state.prompt;
    const raw = await decoder.decode(decodeJob("click", image, prompt));
    if (!raw) return;
    const out = shown(raw, prompt, image);
    const before = state;
    setState(applyResult(state, version, out));
    if (state !== before) {
      timings.click.push(performance.now() - t0);
      timings.decode.push(out.decodeMs);
    }
  } catch (e) {
    reportError(e);
  }
}

async function hoverAt(x: number, y: number, t0: number): Promise<void> {
  if (!settings.hover || !isReady() || !isPromptEmpty(state.prompt)) return;
  const image = state.image!;
  try {
    const version = state.promptVersion;
    const raw = await decoder.decode(decodeJob("hover", image, { points: [[x, y]], labels: [1], box: null, maskInput: null }));
    // A click or another image since then makes this preview stale.
    if (!raw || version !== state.promptVersion || !isPromptEmpty(state.prompt) || !pointerOnStage) return;
    const snap = snapFor(image);
    const snapped = snap ? snapPreview(raw, snap) : raw;
    const preview = clickedRegions ? keepPreviewRegion(snapped, x, y, image.height, image.width) : snapped;
    hoverPreview = { preview, imageId: image.id, x, y };
    draw();
    timings.hover.push(performance.now() - t0);
  } catch (e) {
    reportError(e);
  }
}

function clearHover(): void {
  decoder.cancelHover();
  if (hoverPreview) {
    hoverPreview = null;
    draw();
  }
}

// ---------------------------------------------------------------- saving and effects

function colorForNewCategory(): string {
  return view.categoryColorInput();
}

async function ensureCategory(): Promise<void> {
  if (state.currentCategory !== null) return;
  const created = await api.createCategory("object", colorForNewCategory());
  setState(addCategory(state, created));
  localStorage.setItem(LAST_CATEGORY_KEY, String(created.id));
}

async function acceptChosen(): Promise<void> {
  if (!chosenCandidate(state) || !state.result || !state.image || saving) return;
  saving = true;
  try {
    await ensureCategory();
    const from = state;
    const candidate = chosenCandidate(from)!;
    const { image, result } = from;
    if (!image || !result) return;
    const logits = result.lowRes.subarray(candidate.token * LOW_RES_PIXELS, (candidate.token + 1) * LOW_RES_PIXELS);
    const positives = clickedRegions ? positiveClicks(from.prompt) : undefined;
    const rle = await maskEncoder.encode(logits, image.height, image.width, positives, snapFor(image)?.imageId);
    const body = annotationBody(from, rle);
    if (!body) return;
    const saved = await api.createAnnotation(image.id, body);
    if (state.image?.id !== image.id) return;
    setState(objectSaved(state, saved, from));
    bumpCount(image.id, +1);
  } catch (e) {
    reportError(e);
  } finally {
    saving = false;
  }
}

function bumpCount(imageId: number, delta: number): void {
  const im = images.find((i) => i.id === imageId);
  if (im) im.num_annotations = Math.max(0, im.num_annotations + delta);
  updateNavigation();
}

/** Carries out undo/redo/edit effects in order; a failure is shown and stops the rest. */
async function runEffects(effects: Effect[]): Promise<void> {
  const imageId = state.image?.id;
  if (imageId === undefined) return;
  try {
    for (const effect of effects) {
      if (effect.type === "decode") void decodePrompt(performance.now());
      else if (effect.type === "delete") {
        await api.deleteAnnotation(effect.id);
        bumpCount(imageId, -1);
      } else if (effect.type === "create") {
        const saved = await api.createAnnotation(imageId, effect.body);
        if (state.image?.id === imageId) setState(replaceObjectId(state, effect.tempId, saved));
        bumpCount(imageId, +1);
      } else if (effect.type === "update") {
        const version = state.objects.find((o) => o.id === effect.id)?.version;
        const saved = await api.updateAnnotation(effect.id, version, { category_id: effect.category_id });
        if (state.image?.id === imageId) setState(objectUpdated(state, saved));
      }
    }
  } catch (e) {
    reportError(e);
  }
}

function apply([next, effects]: [SessionState, Effect[]]): void {
  setState(next);
  void runEffects(effects);
}

// ---------------------------------------------------------------- categories

async function loadCategories(): Promise<void> {
  const categories = await api.categories();
  const last = Number(localStorage.getItem(LAST_CATEGORY_KEY));
  state = createSession(categories, categories.some((c) => c.id === last) ? last : null);
}

async function createCategory(name: string, color: string): Promise<void> {
  try {
    const created: Category = await api.createCategory(name, color);
    setState(addCategory(state, { ...created, color: created.color ?? color }));
    view.rememberColor(created.id, created.color ?? color);
    localStorage.setItem(LAST_CATEGORY_KEY, String(created.id));
  } catch (e) {
    reportError(e);
  }
}

// ---------------------------------------------------------------- input

let pointerOnStage = false;
let press: { x: number; y: number; button: number; shift: boolean } | null = null;
let dragBox: [number, number, number, number] | null = null;
let panning: { x: number; y: number } | null = null;
let spaceHeld = false;

function imagePoint(e: MouseEvent): [number, number] {
  const image = state.image!;
  return clientToImage(e.clientX, e.clientY, view.stageBox(), viewTransform, image.width, image.height);
}

function onMouseDown(e: MouseEvent): void {
  if (!state.image) return;
  if (e.button === 1 || (e.button === 0 && spaceHeld)) {
    panning = { x: e.clientX, y: e.clientY };
    view.setPanning(true);
    e.preventDefault();
    return;
  }
  if (e.button === 0 || e.button === 2) {
    press = { x: e.clientX, y: e.clientY, button: e.button, shift: e.shiftKey };
    // No preview starts while the button is down, so the click (at mouse-up) finds the workers sooner free.
    decoder.cancelHover();
  }
}

function onMouseMove(e: MouseEvent): void {
  if (panning) {
    viewTransform = panBy(viewTransform, e.clientX - panning.x, e.clientY - panning.y, view.stageBox());
    panning = { x: e.clientX, y: e.clientY };
    draw();
    return;
  }
  if (!state.image) return;
  if (press && press.button === 0) {
    const moved = Math.hypot(e.clientX - press.x, e.clientY - press.y) > DRAG_THRESHOLD_PX;
    if (moved || dragBox) {
      const start = clientToImage(press.x, press.y, view.stageBox(), viewTransform, state.image.width, state.image.height);
      const [x, y] = imagePoint(e);
      dragBox = [start[0], start[1], x, y];
      clearHover();
      view.drawDragBox(dragBox, state, viewTransform);
    }
    return;
  }
  if (pointerOnStage && !press) {
    const [x, y] = imagePoint(e);
    void hoverAt(x, y, performance.now());
  }
}

function onMouseUp(e: MouseEvent): void {
  if (panning) {
    panning = null;
    view.setPanning(false);
    return;
  }
  const p = press;
  press = null;
  if (!p || !state.image || !isReady()) {
    dragBox = null;
    return;
  }
  const t0 = performance.now();
  if (dragBox) {
    const [x0, y0, x1, y1] = clampBox(dragBox);
    dragBox = null;
    if (Math.abs(x1 - x0) >= 1 && Math.abs(y1 - y0) >= 1) {
      clearHover();
      setState(setBox(state, x0, y0, x1, y1));
      void decodePrompt(t0);
    } else draw();
    return;
  }
  if (!pointerOnStage) return;
  const [x, y] = imagePoint(e);
  const label = p.button === 2 || p.shift ? 0 : 1;
  // Clicking where the last hover decoded the full output (no hover graph): that is this click's output already.
  const h = hoverPreview;
  const full = h?.preview.full;
  const reuse = label === 1 && isPromptEmpty(state.prompt) && full && h.imageId === state.image.id && h.x === x && h.y === y;
  clearHover();
  setState(addPoint(state, x, y, label));
  if (reuse) {
    setState(applyResult(state, state.promptVersion, shown(full, state.prompt, state.image)));
    timings.click.push(performance.now() - t0);
  } else void decodePrompt(t0);
}

function clampBox(b: [number, number, number, number]): [number, number, number, number] {
  const w = state.image!.width;
  const h = state.image!.height;
  const cx = (v: number) => Math.min(w, Math.max(0, v));
  const cy = (v: number) => Math.min(h, Math.max(0, v));
  return [cx(b[0]), cy(b[1]), cx(b[2]), cy(b[3])];
}

function onWheel(e: WheelEvent): void {
  if (!state.image) return;
  e.preventDefault();
  const box = view.stageBox();
  viewTransform = zoomAt(viewTransform, e.clientX - box.left, e.clientY - box.top, Math.exp(-e.deltaY * 0.0015), box);
  draw();
}

function isTyping(target: EventTarget | null): boolean {
  return target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement;
}

function onKeyDown(e: KeyboardEvent): void {
  if (isTyping(e.target)) return;
  const ctrl = e.ctrlKey || e.metaKey;
  if (ctrl && (e.key === "z" || e.key === "Z")) {
    e.preventDefault();
    clearHover();
    apply(e.shiftKey ? redo(state) : undo(state));
    return;
  }
  if (ctrl && (e.key === "y" || e.key === "Y")) {
    e.preventDefault();
    apply(redo(state));
    return;
  }
  if (ctrl || e.altKey) return;
  switch (e.key) {
    case "1":
    case "2":
    case "3":
      setState(chooseLevel(state, (["subpart", "part", "whole"] as const)[Number(e.key) - 1]));
      break;
    case "Enter":
      e.preventDefault();
      void acceptChosen();
      break;
    case "Escape":
      clearHover();
      setState(clearPrompt(state));
      break;
    case "ArrowRight":
      e.preventDefault();
      void openImageAt(imageIndex + 1);
      break;
    case "ArrowLeft":
      e.preventDefault();
      void openImageAt(imageIndex - 1);
      break;
    case "0":
      viewTransform = IDENTITY_VIEW;
      draw();
      break;
    case " ":
      spaceHeld = true;
      view.setPanning(true);
      e.preventDefault();
      break;
  }
}

function onKeyUp(e: KeyboardEvent): void {
  if (e.key === " ") {
    spaceHeld = false;
    if (!panning) view.setPanning(false);
  }
}

function wireInput(): void {
  const stage = view.stage;
  stage.addEventListener("mousedown", onMouseDown);
  stage.addEventListener("contextmenu", (e) => e.preventDefault());
  stage.addEventListener("wheel", onWheel, { passive: false });
  stage.addEventListener("mouseenter", () => (pointerOnStage = true));
  stage.addEventListener("mouseleave", () => {
    pointerOnStage = false;
    clearHover();
  });
  window.addEventListener("mousemove", onMouseMove);
  window.addEventListener("mouseup", onMouseUp);
  window.addEventListener("keydown", onKeyDown);
  window.addEventListener("keyup", onKeyUp);
  window.addEventListener("resize", () => {
    if (state.image) view.layout(state.image);
    viewTransform = IDENTITY_VIEW;
    draw();
  });

  view.onCandidate = (i) => setState(chooseIndex(state, i));
  view.onPrev = () => void openImageAt(imageIndex - 1);
  view.onNext = () => void openImageAt(imageIndex + 1);
  view.onCategory = (id) => {
    setState(setCurrentCategory(state, id));
    localStorage.setItem(LAST_CATEGORY_KEY, String(id));
  };
  view.onAddCategory = (name, color) => void createCategory(name, color);
  view.onSelectObject = (id) => setState(selectObject(state, id));
  view.onToggleHidden = (id) => setState(toggleHidden(state, id));
  view.onDeleteObject = (id) => apply(deleteObject(state, id));
  view.onRelabelObject = (id, categoryId) => apply(relabelObject(state, id, categoryId));
}

// ---------------------------------------------------------------- start

async function start(): Promise<void> {
  const serverStatus = await api.status().catch(() => null);
  clickedRegions = settings.clickedRegions ?? clickedRegionsFor(serverStatus?.model);
  snapEdges = settings.snapEdges ?? snapEdgesFor(serverStatus?.model);
  decoder = createDecoder(serverStatus);
  wireInput();
  decoder
    .ready()
    .then((info) => {
      decoderReady = true;
      const threads = info.backend === "wasm" ? ` · ${info.numThreads} thread${info.numThreads > 1 ? "s" : ""}` : "";
      const graphs = `${info.fastPath ? " · prepared fast path" : ""}${info.previewGraph ? " + hover graph" : ""}`;
      const status = `decoder: ${info.backend}${threads}${graphs}${snapEdges ? " · snapped edges" : ""}${clickedRegions ? " · clicked regions" : ""}`;
      view.setStatus(status);
      draw();
      void decoder.oneThreadWorkersReady().then((n) => n && view.setStatus(`${status} + ${n} × 1-thread worker`));
    })
    .catch(() => {
      /* onFatal has shown the message */
    });
  try {
    await loadCategories();
    images = await api.images();
  } catch (e) {
    view.setLoading("The server did not answer.");
    reportError(e);
    return;
  }
  if (images.length === 0) {
    view.setLoading("No images: start the server with --images DIR holding .jpg or .png files.");
    return;
  }
  const wanted = images.findIndex((im) => im.id === settings.imageId);
  await openImageAt(wanted >= 0 ? wanted : 0);
}

void start();
