/** Page settings from the URL (?backend=webgpu&threads=2&quantized=1&style=official&decoder=URL&image=ID&hover=0&hovergraph=0&secondworker=0&hoverpair=0&fast=0|1&regions=clicked|all&edges=snap|off). */
import type { DecoderStyle, ExecutionBackend } from "./worker_protocol";

export interface Settings {
  backend: ExecutionBackend;
  numThreads: number;
  quantized: boolean;
  style: DecoderStyle;
  /** Overrides the decoder URL (the benchmark uses it for the official export style). */
  decoderUrl: string | null;
  imageId: number | null;
  /** Hover previews (?hover=0 turns them off, e.g. to time clicks alone). */
  hover: boolean;
  /** Hover previews from the hover graph when the server has it (?hovergraph=0: from the per-click graph). */
  hoverGraph: boolean;
  /**
   * One-thread decoder workers beside the main one when two or more threads are used: two, whose
   * pair previews hovers side by side (?hoverpair=0: one; ?secondworker=0: none).
   */
  oneThreadWorkers: number;
  /** The two-graph fast path: forced on (?fast=1) or off (?fast=0); null: when the server lists it. */
  fastPath: boolean | null;
  /**
   * "Clicked regions": answers to clicks keep only their connected regions that hold a positive click
   * (?regions=clicked) or stay whole (?regions=all); null: the model's default (`clickedRegionsFor`).
   */
  clickedRegions: boolean | null;
  /** "Snap edges": answers' edges snapped to the image's colour edges (?edges=snap) or as the decoder gives
   * them (?edges=off); null: the model's default (`snapEdgesFor`). */
  snapEdges: boolean | null;
}

/** The default of the "clicked regions" setting for the server's model (/api/status "model"): on for the
 * embedded tiny model, whose answers also cover look-alike regions elsewhere, off for official SAM
 * checkpoints, whose answers may rightly hold several regions (an object split by an occluder). */
export function clickedRegionsFor(model: unknown): boolean {
  return model === "tiny";
}

/** The default of the "snap edges" setting for the server's model: on for the embedded tiny model, whose
 * answers mark 4 x 4-pixel cells of the 256 frame, off for official SAM checkpoints, whose edges are the
 * decoder's own (MODEL_CARD.md, "Snapped edges"). */
export function snapEdgesFor(model: unknown): boolean {
  return model === "tiny";
}

export function readSettings(search: string, hardwareConcurrency: number, crossOriginIsolated: boolean): Settings {
  const q = new URLSearchParams(search);
  const threads = Number(q.get("threads"));
  // Multi-threaded WASM needs SharedArrayBuffer, which needs cross-origin isolation (COOP/COEP).
  const maxThreads = crossOriginIsolated ? Math.max(1, hardwareConcurrency || 1) : 1;
  const image = q.get("image");
  return {
    backend: q.get("backend") === "webgpu" ? "webgpu" : "wasm",
    numThreads: threads > 0 ? Math.min(threads, maxThreads) : maxThreads,
    quantized: q.get("quantized") === "1",
    style: q.get("style") === "official" ? "official" : "trimask",
    decoderUrl: q.get("decoder"),
    imageId: image !== null && /^\d+$/.test(image) ? Number(image) : null,
    hover: q.get("hover") !== "0",
    hoverGraph: q.get("hovergraph") !== "0",
    oneThreadWorkers: q.get("secondworker") === "0" ? 0 : q.get("hoverpair") === "0" ? 1 : 2,
    fastPath: q.get("fast") === "1" ? true : q.get("fast") === "0" ? false : null,
    clickedRegions: q.get("regions") === "clicked" ? true : q.get("regions") === "all" ? false : null,
    snapEdges: q.get("edges") === "snap" ? true : q.get("edges") === "off" ? false : null,
  };
}
