/** Messages between the page and the decoder Web Worker (decoder.worker.ts). */
import type { DecodeOutput } from "./session";

export type ExecutionBackend = "wasm" | "webgpu";

/**
 * "trimask": our decoder.onnx (iou_predictions, low_res_masks, display_masks, areas).
 * "official": SAM's own export style (masks at full image resolution), for the benchmark.
 */
export type DecoderStyle = "trimask" | "official";

export interface InitRequest {
  type: "init";
  modelUrl: string;
  backend: ExecutionBackend;
  numThreads: number;
  wasmPaths: string;
  style: DecoderStyle;
  /**
   * The optional two-graph fast path (decoder_prepare.onnx once per image, decoder_prepared.onnx
   * for every prompt, mask input included); used only if both load and have the expected inputs/outputs.
   */
  fastPath: FastPathUrls | null;
  /**
   * Decodes of a made-up prompt to run before reporting ready: the browser compiles WASM
   * first with a quick compiler and only later with the optimizing one, so the first few
   * decodes of a worker are up to 3x slower (measured). 0 or absent: none.
   */
  warmUp?: number;
}

/**
 * The fast path's graphs: decoder_prepare.onnx (once per image), decoder_prepared.onnx (every
 * prompt) and, optionally, decoder_hover.onnx (decoder_prepared cut to the one mask a hover
 * preview shows: the best multimask candidate, only over the part of the frame the display reads).
 */
export interface FastPathUrls {
  prepareUrl: string;
  preparedUrl: string;
  hoverUrl?: string | null;
}

export interface EmbeddingRequest {
  type: "embedding";
  imageId: number;
  /** Raw little-endian float16 bytes of [1, 256, 64, 64] (transferred). */
  fp16: ArrayBuffer;
}

/** One prompt for the decoder, already in the decoder's terms. */
export interface PromptInputs {
  imageId: number;
  /** Points in SAM's 1024 frame, flattened [x0, y0, x1, y1, ...], box corners included. */
  coords: Float32Array;
  /** One label per point: 1 fg, 0 bg, 2/3 box corners, -1 padding. */
  labels: Float32Array;
  /** [256 x 256] logits, or null for none. */
  maskInput: Float32Array | null;
  /** Original image (H, W). */
  origHw: [number, number];
}

export interface DecodeRequest extends PromptInputs {
  type: "decode";
  id: number;
  /**
   * Only the best multimask candidate is wanted (a hover preview): a worker with the hover graph
   * answers with a PreviewMessage, any other with a ResultMessage.
   */
  preview?: boolean;
}

export type WorkerRequest = InitRequest | EmbeddingRequest | DecodeRequest;

export interface ReadyMessage {
  type: "ready";
  backend: ExecutionBackend;
  numThreads: number;
  /** Whether the two-graph fast path is in use. */
  fastPath: boolean;
  /** Whether preview requests run the hover graph (and are answered with a PreviewMessage). */
  previewGraph?: boolean;
}

/**
 * Names of the fast path's per-image tensors (decoder_prepare.onnx outputs, decoder_prepared.onnx
 * inputs; trimask.export.prepared_decoder.PREPARED_NAMES).
 */
export const PREPARED_NAMES = [
  "image_tokens",
  "layer0_keys",
  "layer0_values",
  "layer0_queries",
  "layer1_keys",
  "layer1_values",
  "layer1_queries",
  "final_keys",
  "final_values",
  "upscaling",
] as const;

/** The per-click inputs decoder_prepared.onnx takes besides the prepared tensors (decoder.onnx's, less the embedding). */
export const PREPARED_PROMPT_INPUTS = ["point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"] as const;

export interface EmbeddingReadyMessage {
  type: "embedding-ready";
  imageId: number;
}

export interface ResultMessage extends DecodeOutput {
  type: "result";
  id: number;
  /** Time spent in session.run plus output handling, ms. */
  decodeMs: number;
}

/** The hover graph's outputs (trimask.export.hover_decoder.HOVER_OUTPUT_NAMES) the page uses. */
export const HOVER_OUTPUTS = ["iou_predictions", "best_token", "low_res_mask", "display_mask"] as const;

/** One mask for a hover preview: the multimask candidate with the highest predicted IoU. */
export interface Preview {
  /** Its decoder token (1..3). */
  token: number;
  /** Predicted IoU of all four tokens, [4]. */
  iou: Float32Array;
  /** Its 0/255 mask over the image's valid region, [displayH x displayW] row-major. */
  display: Uint8Array;
  displayH: number;
  displayW: number;
  /** Its logits over (at least) the valid part of the 256 x 256 frame, rows of `lowResW` values. */
  lowRes: Float32Array;
  lowResW: number;
}

export interface PreviewMessage extends Preview {
  type: "preview";
  id: number;
  decodeMs: number;
}

export interface ErrorMessage {
  type: "error";
  /** The decode request's id, or null for init/embedding failures. */
  id: number | null;
  message: string;
}

export type WorkerMessage = ReadyMessage | EmbeddingReadyMessage | ResultMessage | PreviewMessage | ErrorMessage;

/** SAM's prompt encoding: points (+ a padding point when there is no box) then box corners. */
export function encodePromptInputs(
  points: [number, number][],
  labels: number[],
  box: [number, number, number, number] | null,
): { coords: Float32Array; labels: Float32Array } {
  const n = points.length + (box ? 2 : 1);
  const coords = new Float32Array(n * 2);
  const lab = new Float32Array(n);
  points.forEach(([x, y], i) => {
    coords[2 * i] = x;
    coords[2 * i + 1] = y;
    lab[i] = labels[i];
  });
  const k = points.length;
  if (box) {
    coords.set([box[0], box[1], box[2], box[3]], 2 * k);
    lab[k] = 2;
    lab[k + 1] = 3;
  } else {
    lab[k] = -1;
  }
  return { coords, labels: lab };
}
