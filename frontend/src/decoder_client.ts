/**
 * The page's side of the decoder worker. One decode runs at a time; while it
 * runs, newer requests replace older waiting ones (latest wins), so a moving
 * mouse never builds a queue of stale hover decodes and a click never waits
 * behind them.
 */
import type { DecodeOutput } from "./session";
import type { DecodeRequest, DecoderStyle, ExecutionBackend, PromptInputs, WorkerMessage, WorkerRequest } from "./worker_protocol";

export type DecodeKind = "hover" | "click";

export interface DecodeJob extends PromptInputs {
  kind: DecodeKind;
}

export interface DecoderOptions {
  modelUrl: string;
  fastPath: { prepareUrl: string; preparedUrl: string } | null;
  backend: ExecutionBackend;
  numThreads: number;
  wasmPaths: string;
  style: DecoderStyle;
}

export interface ReadyInfo {
  backend: ExecutionBackend;
  numThreads: number;
  fastPath: boolean;
}

/** Resolved with the output, or null when a newer request of the same kind superseded this one. */
type Settle = (out: (DecodeOutput & { decodeMs: number }) | null) => void;

interface Waiting {
  job: DecodeJob;
  settle: Settle;
  reject: (e: Error) => void;
}

export class DecoderClient {
  private worker: Worker;
  private nextId = 1;
  private running: (Waiting & { id: number; followers: Settle[] }) | null = null;
  private waiting: { click: Waiting | null; hover: Waiting | null } = { click: null, hover: null };
  private readyPromise: Promise<ReadyInfo>;
  private embeddingWaiters = new Map<number, () => void>();
  /** Set when init or an embedding fails; shown to the user by the controller. */
  onFatal: (message: string) => void = () => {};

  constructor(options: DecoderOptions) {
    this.worker = new Worker(new URL("./decoder.worker.ts", import.meta.url), { type: "module" });
    let resolveReady!: (v: ReadyInfo) => void;
    let rejectReady!: (e: Error) => void;
    this.readyPromise = new Promise((res, rej) => {
      resolveReady = res;
      rejectReady = rej;
    });
    this.worker.onmessage = (event: MessageEvent<WorkerMessage>) => {
      const msg = event.data;
      if (msg.type === "ready") resolveReady({ backend: msg.backend, numThreads: msg.numThreads, fastPath: msg.fastPath });
      else if (msg.type === "embedding-ready") {
        this.embeddingWaiters.get(msg.imageId)?.();
        this.embeddingWaiters.delete(msg.imageId);
      } else if (msg.type === "result") this.finish(msg.id, msg, null);
      else if (msg.type === "error") {
        if (msg.id === null) {
          rejectReady(new Error(msg.message));
          this.onFatal(msg.message);
        } else this.finish(msg.id, null, new Error(msg.message));
      }
    };
    this.worker.onerror = (event) => {
      const message = event.message || "the decoder worker failed to start";
      rejectReady(new Error(message));
      this.onFatal(message);
    };
    this.post({ type: "init", ...options });
  }

  ready(): Promise<ReadyInfo> {
    return this.readyPromise;
  }

  /** Hands the image's float16 embedding to the worker (transferred); resolves once it is in place. */
  setEmbedding(imageId: number, fp16: ArrayBuffer): Promise<void> {
    return new Promise((resolve) => {
      this.embeddingWaiters.set(imageId, resolve);
      this.post({ type: "embedding", imageId, fp16 }, [fp16]);
    });
  }

  /**
   * Queues a decode; a newer job of the same kind replaces it while it waits. A click drops
   * waiting hovers, and shares the running hover's result when it asks for the same prompt
   * (the pointer hovered exactly where it then clicked).
   */
  decode(job: DecodeJob): Promise<(DecodeOutput & { decodeMs: number }) | null> {
    return new Promise((settle, reject) => {
      if (job.kind === "click" && this.running && sameInputs(this.running.job, job)) {
        this.running.followers.push(settle);
        return;
      }
      const prev = this.waiting[job.kind];
      prev?.settle(null);
      this.waiting[job.kind] = { job, settle, reject };
      if (job.kind === "click" && this.waiting.hover) {
        this.waiting.hover.settle(null);
        this.waiting.hover = null;
      }
      this.pump();
    });
  }

  /** Forgets waiting hover decodes (the pointer left the image or a prompt started). */
  cancelHover(): void {
    this.waiting.hover?.settle(null);
    this.waiting.hover = null;
  }

  private pump(): void {
    if (this.running) return;
    const next = this.waiting.click ?? this.waiting.hover;
    if (!next) return;
    if (next === this.waiting.click) this.waiting.click = null;
    else this.waiting.hover = null;
    const id = this.nextId++;
    this.running = { ...next, id, followers: [] };
    const { kind: _kind, ...inputs } = next.job;
    const req: DecodeRequest = { type: "decode", id, ...inputs };
    this.post(req);
  }

  private finish(id: number, out: (DecodeOutput & { decodeMs: number }) | null, error: Error | null): void {
    const run = this.running;
    if (!run || run.id !== id) return;
    this.running = null;
    if (error) run.reject(error);
    else run.settle(out);
    // Followers (a click on the hovered point) get the same output, or retry on error.
    for (const f of run.followers) f(error ? null : out);
    this.pump();
  }

  private post(msg: WorkerRequest, transfer: Transferable[] = []): void {
    this.worker.postMessage(msg, transfer);
  }
}

function sameArray(a: Float32Array | null, b: Float32Array | null): boolean {
  if (a === b) return true;
  if (!a || !b || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** True when two jobs would give the same decoder output. */
export function sameInputs(a: DecodeJob, b: DecodeJob): boolean {
  return (
    a.imageId === b.imageId &&
    a.origHw[0] === b.origHw[0] &&
    a.origHw[1] === b.origHw[1] &&
    sameArray(a.coords, b.coords) &&
    sameArray(a.labels, b.labels) &&
    sameArray(a.maskInput, b.maskInput)
  );
}
