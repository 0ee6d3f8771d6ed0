/// <reference lib="webworker" />
/**
 * Runs the decoder in onnxruntime-web off the main thread: the fast path (decoder_prepare.onnx once
 * per image, decoder_prepared.onnx per prompt, decoder_hover.onnx per hover preview) when the server
 * offers it, else decoder.onnx. Holds the current image's embedding (and prepared tensors) so each
 * decode only sends the prompt.
 */
import * as ortWasm from "onnxruntime-web/wasm";
import { float16ToFloat32 } from "./float16";
import {
  HOVER_OUTPUTS,
  PREPARED_NAMES,
  PREPARED_PROMPT_INPUTS,
  type DecodeRequest,
  type DecoderStyle,
  type FastPathUrls,
  type InitRequest,
  type WorkerMessage,
  type WorkerRequest,
} from "./worker_protocol";

type Ort = typeof ortWasm;

const EMBEDDING_DIMS = [1, 256, 64, 64];
const LOW_RES = 256;

let ort: Ort = ortWasm;
let session: ortWasm.InferenceSession | null = null;
let style: DecoderStyle = "trimask";
let embedding: ortWasm.Tensor | null = null;
let embeddingImageId = -1;
/** Fast path: the per-image graph, the per-click graph, and this image's prepared tensors. */
let prepareSession: ortWasm.InferenceSession | null = null;
let preparedSession: ortWasm.InferenceSession | null = null;
/** Fast path, optional: the per-click graph cut to a hover preview's one mask. */
let hoverSession: ortWasm.InferenceSession | null = null;
let prepared: Record<string, ortWasm.Tensor> | null = null;
const zeroMask = new Float32Array(LOW_RES * LOW_RES);

const post = (msg: WorkerMessage, transfer: Transferable[] = []) => (self as DedicatedWorkerGlobalScope).postMessage(msg, transfer);

/** A typed array that owns its whole (non-shared) buffer, so it can be transferred. */
function owned<T extends Uint8Array | Float32Array>(a: T): T {
  const whole = a.byteOffset === 0 && a.byteLength === a.buffer.byteLength;
  return whole && a.buffer instanceof ArrayBuffer ? a : (a.slice() as T);
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

async function init(req: InitRequest): Promise<void> {
  let backend = req.backend;
  if (backend === "webgpu") {
    // Only load the WebGPU build when an adapter exists: its WASM fallback is slower than the plain build.
    const gpu = (navigator as Navigator & { gpu?: { requestAdapter(): Promise<unknown> } }).gpu;
    const adapter = gpu ? await gpu.requestAdapter().catch(() => null) : null;
    if (adapter) ort = (await import("onnxruntime-web/webgpu")) as unknown as Ort;
    else backend = "wasm";
  }
  ort.env.wasm.wasmPaths = req.wasmPaths;
  ort.env.wasm.numThreads = req.numThreads;
  ort.env.logLevel = "error";
  const options: ortWasm.InferenceSession.SessionOptions = {
    executionProviders: backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"],
    graphOptimizationLevel: "all",
  };
  style = req.style;
  // With the fast path every prompt runs the prepared graph; decoder.onnx is loaded only without it.
  if (req.fastPath && style === "trimask") await loadFastPath(req.fastPath, options);
  if (!preparedSession) session = await ort.InferenceSession.create(await download(req.modelUrl), options);
  if (req.warmUp) await warmUp(req.warmUp);
  // onnxruntime-web falls back to one thread (with a console warning) when the page is not
  // cross-origin isolated; report the count it really uses. Its builds all need WASM SIMD.
  const numThreads = backend === "wasm" ? (ort.env.wasm.numThreads ?? req.numThreads) : req.numThreads;
  post({ type: "ready", backend, numThreads, fastPath: preparedSession !== null, previewGraph: hoverSession !== null });
}

/** Runs the per-click graph (and the hover graph, in turn) `times` on a zero embedding and one point, so their code gets optimized. */
async function warmUp(times: number): Promise<void> {
  await setEmbedding(-1, new ArrayBuffer(2 * EMBEDDING_DIMS.reduce((a, b) => a * b, 1)), false);
  for (let i = 0; i < times; i++) {
    const coords = new Float32Array([100 + 100 * i, 500, 0, 0]);
    const preview = i % 2 === 1;
    const request: DecodeRequest = { type: "decode", id: -1, imageId: -1, coords, labels: new Float32Array([1, -1]), maskInput: null, origHw: [1024, 1024], preview };
    await decode(request, false);
  }
  embedding = null;
  prepared = null;
  embeddingImageId = -1;
}

async function download(url: string): Promise<Uint8Array> {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`could not download the decoder (${url}: HTTP ${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

/**
 * Loads the optional fast path; any mismatch (a server without it, or an older pair of graphs)
 * leaves decoder.onnx alone in use. Without a usable hover graph, previews take the per-click graph.
 */
async function loadFastPath(urls: FastPathUrls, options: ortWasm.InferenceSession.SessionOptions): Promise<void> {
  try {
    const prepare = await ort.InferenceSession.create(await download(urls.prepareUrl), options);
    if (!PREPARED_NAMES.every((n) => prepare.outputNames.includes(n))) return;
    const decoder = await ort.InferenceSession.create(await download(urls.preparedUrl), options);
    const expected = [...PREPARED_PROMPT_INPUTS, ...PREPARED_NAMES];
    if (decoder.inputNames.length !== expected.length || !expected.every((n) => decoder.inputNames.includes(n))) return;
    prepareSession = prepare;
    preparedSession = decoder;
  } catch {
    // not served: the complete decoder.onnx does everything
    return;
  }
  if (!urls.hoverUrl) return;
  try {
    const hover = await ort.InferenceSession.create(await download(urls.hoverUrl), options);
    const inputsMatch = hover.inputNames.length === preparedSession.inputNames.length && preparedSession.inputNames.every((n) => hover.inputNames.includes(n));
    if (inputsMatch && HOVER_OUTPUTS.every((n) => hover.outputNames.includes(n))) hoverSession = hover;
  } catch {
    // not served (an older server): previews run the per-click graph
  }
}

async function setEmbedding(imageId: number, fp16: ArrayBuffer, announce = true): Promise<void> {
  embedding = new ort.Tensor("float32", float16ToFloat32(fp16), EMBEDDING_DIMS);
  embeddingImageId = imageId;
  prepared = prepareSession ? await prepareSession.run({ image_embeddings: embedding }) : null;
  if (announce) post({ type: "embedding-ready", imageId });
}

/** Official export style: threshold the four full-resolution logit maps here, as SAM's demo does. */
function officialOutputs(masks: ortWasm.Tensor): { display: Uint8Array; areas: Float32Array; h: number; w: number } {
  const [, tokens, h, w] = masks.dims as number[];
  const logits = masks.data as Float32Array;
  const display = new Uint8Array(tokens * h * w);
  const areas = new Float32Array(tokens);
  for (let t = 0; t < tokens; t++) {
    let count = 0;
    const base = t * h * w;
    for (let i = 0; i < h * w; i++) {
      if (logits[base + i] > 0) {
        display[base + i] = 255;
        count++;
      }
    }
    areas[t] = count / (h * w);
  }
  return { display, areas, h, w };
}

async function decode(req: DecodeRequest, reply = true): Promise<void> {
  if (!session && !preparedSession) throw new Error("the decoder is not loaded");
  if (!embedding || embeddingImageId !== req.imageId) throw new Error("no embedding for this image");
  const t0 = performance.now();
  const n = req.labels.length;
  const feeds: Record<string, ortWasm.Tensor> = {
    image_embeddings: embedding,
    point_coords: new ort.Tensor("float32", req.coords, [1, n, 2]),
    point_labels: new ort.Tensor("float32", req.labels, [1, n]),
    mask_input: new ort.Tensor("float32", req.maskInput ?? zeroMask, [1, 1, LOW_RES, LOW_RES]),
    has_mask_input: new ort.Tensor("float32", new Float32Array([req.maskInput ? 1 : 0]), [1]),
    orig_im_size: new ort.Tensor("float32", new Float32Array(req.origHw), [2]),
  };
  if (style === "official" && session) {
    const out = await session.run(feeds, ["masks", "iou_predictions", "low_res_masks"]);
    const { display, areas, h, w } = officialOutputs(out.masks);
    const iou = out.iou_predictions.data as Float32Array;
    const lowRes = owned(out.low_res_masks.data as Float32Array);
    const msg: WorkerMessage = { type: "result", id: req.id, iou, areas, display, displayH: h, displayW: w, lowRes, decodeMs: performance.now() - t0 };
    if (reply) post(msg, [display.buffer, lowRes.buffer]);
    return;
  }
  const names = ["iou_predictions", "low_res_masks", "display_masks", "areas"];
  // The fast path gives decoder.onnx's outputs, mask input included, with the image-side work done once per image.
  let out: ortWasm.InferenceSession.ReturnType;
  if (preparedSession && prepared) {
    const fastFeeds: Record<string, ortWasm.Tensor> = { ...prepared };
    for (const name of PREPARED_PROMPT_INPUTS) fastFeeds[name] = feeds[name];
    if (req.preview && hoverSession) {
      const preview = await hoverSession.run(fastFeeds, [...HOVER_OUTPUTS]);
      const [, , displayH, displayW] = preview.display_mask.dims as number[];
      const display = owned(preview.display_mask.data as Uint8Array);
      const lowRes = owned(preview.low_res_mask.data as Float32Array);
      const lowResW = (preview.low_res_mask.dims as number[])[3];
      const token = Number((preview.best_token.data as BigInt64Array)[0]);
      const iou = preview.iou_predictions.data as Float32Array;
      const msg: WorkerMessage = { type: "preview", id: req.id, token, iou, display, displayH, displayW, lowRes, lowResW, decodeMs: performance.now() - t0 };
      if (reply) post(msg, [display.buffer, lowRes.buffer]);
      return;
    }
    out = await preparedSession.run(fastFeeds, names);
  } else if (session) {
    out = await session.run(feeds, names);
  } else {
    throw new Error("no prepared tensors for this image");
  }
  const dims = out.display_masks.dims as number[];
  const display = owned(out.display_masks.data as Uint8Array);
  const lowRes = owned(out.low_res_masks.data as Float32Array);
  const msg: WorkerMessage = {
    type: "result",
    id: req.id,
    iou: out.iou_predictions.data as Float32Array,
    areas: out.areas.data as Float32Array,
    display,
    displayH: dims[2],
    displayW: dims[3],
    lowRes,
    decodeMs: performance.now() - t0,
  };
  if (reply) post(msg, [display.buffer, lowRes.buffer]);
}

self.onmessage = async (event: MessageEvent<WorkerRequest>) => {
  const req = event.data;
  try {
    if (req.type === "init") await init(req);
    else if (req.type === "embedding") await setEmbedding(req.imageId, req.fp16);
    else if (req.type === "decode") await decode(req);
  } catch (e) {
    post({ type: "error", id: req.type === "decode" ? req.id : null, message: errorText(e) });
  }
};
