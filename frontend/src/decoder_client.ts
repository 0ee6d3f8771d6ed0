/**
 * The page's side of the decoder workers. Each worker runs one decode at a time;
 * while they run, newer requests replace older waiting ones (latest wins), so a
 * moving mouse never builds a queue of stale hover decodes and a click never
 * waits behind them.
 *
 * Optionally a second, one-thread worker serves hover previews: a hover goes to
 * the main worker when it is idle and to the hover worker while it is busy, so
 * two previews decode at once on two cores. Clicks run on the main worker only
 * (all its threads). A preview that finishes after a newer one was delivered is
 * dropped (resolved null).
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
  /** Start a second, one-thread worker for hover previews once the main one is ready. */
  hoverWorker?: boolean;
}

export interface ReadyInfo {
  backend: ExecutionBackend;
  numThreads: number;
  fastPath: boolean;
}

export type DecodeResult = DecodeOutput & { decodeMs: number };

/** Resolved with the output, or null when a newer request superseded this one. */
type Settle = (out: DecodeResult | null) => void;

interface Waiting {
  job: DecodeJob;
  settle: Settle;
  reject: (e: Error) => void;
  /** Hover order: a preview older than one already delivered is never shown. */
  seq: number;
}

interface Running extends Waiting {
  id: number;
  followers: Settle[];
}

/** One worker and what it holds. */
class Lane {
  running: Running | null = null;
  /** The image whose embedding this worker holds (confirmed by the worker). */
  imageId = -1;
  ready = false;

  constructor(
    readonly worker: Worker,
    readonly clicks: boolean,
  ) {}
}

function newWorker(): Worker {
  return new Worker(new URL("./decoder.worker.ts", import.meta.url), { type: "module" });
}

export class DecoderClient {
  private lanes: Lane[] = [];
  private nextId = 1;
  private hoverSeq = 0;
  /** seq of the newest hover preview delivered. */
  private shownHover = 0;
  private waiting: { click: Waiting | null; hover: Waiting | null } = { click: null, hover: null };
  private readyPromise: Promise<ReadyInfo>;
  private hoverReadyPromise: Promise<boolean>;
  private embeddingWaiters = new Map<number, () => void>();
  /** The current image's embedding, kept for a hover worker that starts (or catches up) later. */
  private embedding: { imageId: number; fp16: ArrayBuffer } | null = null;
  /** Set when init or an embedding fails; shown to the user by the controller. */
  onFatal: (message: string) => void = () => {};

  constructor(private options: DecoderOptions) {
    let resolveReady!: (v: ReadyInfo) => void;
    let rejectReady!: (e: Error) => void;
    this.readyPromise = new Promise((res, rej) => {
      resolveReady = res;
      rejectReady = rej;
    });
    const main = this.addLane(true, {
      ready: (info) => resolveReady(info),
      fatal: (message) => {
        rejectReady(new Error(message));
        this.onFatal(message);
      },
    });
    main.worker.postMessage({ type: "init", ...options } satisfies WorkerRequest);
    this.hoverReadyPromise = options.hoverWorker
      ? this.readyPromise.then(() => this.startHoverLane(), () => false)
      : Promise.resolve(false);
  }

  ready(): Promise<ReadyInfo> {
    return this.readyPromise;
  }

  /** Resolves true once the hover worker serves previews, false if there is none (or it failed). */
  hoverWorkerReady(): Promise<boolean> {
    return this.hoverReadyPromise;
  }

  /** Hands the image's float16 embedding to the workers; resolves once the main worker has it in place. */
  setEmbedding(imageId: number, fp16: ArrayBuffer): Promise<void> {
    if (this.options.hoverWorker) this.embedding = { imageId, fp16: fp16.slice(0) };
    return new Promise((resolve) => {
      this.embeddingWaiters.set(imageId, resolve);
      this.lanes[0].worker.postMessage({ type: "embedding", imageId, fp16 } satisfies WorkerRequest, [fp16]);
      for (const lane of this.lanes.slice(1)) if (lane.ready) this.sendEmbedding(lane);
    });
  }

  /**
   * Queues a decode; a newer job of the same kind replaces it while it waits. A click drops
   * waiting hovers, and shares a running hover's result when it asks for the same prompt
   * (the pointer hovered exactly where it then clicked).
   */
  decode(job: DecodeJob): Promise<DecodeResult | null> {
    return new Promise((settle, reject) => {
      if (job.kind === "click") {
        const same = this.lanes.find((l) => l.running && sameInputs(l.running.job, job));
        if (same) {
          same.running!.followers.push(settle);
          return;
        }
      }
      this.waiting[job.kind]?.settle(null);
      this.waiting[job.kind] = { job, settle, reject, seq: job.kind === "hover" ? ++this.hoverSeq : 0 };
      if (job.kind === "click") this.cancelHover();
      this.pump();
    });
  }

  /** Forgets waiting hover decodes (the pointer left the image or a prompt started). */
  cancelHover(): void {
    this.waiting.hover?.settle(null);
    this.waiting.hover = null;
  }

  private addLane(clicks: boolean, on: { ready: (info: ReadyInfo) => void; fatal: (message: string) => void }): Lane {
    const lane = new Lane(newWorker(), clicks);
    this.lanes.push(lane);
    lane.worker.onmessage = (event: MessageEvent<WorkerMessage>) => {
      const msg = event.data;
      if (msg.type === "ready") {
        lane.ready = true;
        on.ready({ backend: msg.backend, numThreads: msg.numThreads, fastPath: msg.fastPath });
      } else if (msg.type === "embedding-ready") {
        lane.imageId = msg.imageId;
        if (lane === this.lanes[0]) {
          this.embeddingWaiters.get(msg.imageId)?.();
          this.embeddingWaiters.delete(msg.imageId);
        }
        this.pump();
      } else if (msg.type === "result") this.finish(lane, msg.id, msg, null);
      else if (msg.type === "error") {
        if (msg.id === null) on.fatal(msg.message);
        else this.finish(lane, msg.id, null, new Error(msg.message));
      }
    };
    lane.worker.onerror = (event) => on.fatal(event.message || "the decoder worker failed to start");
    return lane;
  }

  /** The one-thread hover worker; a failure only leaves the main worker doing everything. */
  private startHoverLane(): Promise<boolean> {
    return new Promise((resolve) => {
      const lane = this.addLane(false, {
        ready: () => {
          if (this.embedding) this.sendEmbedding(lane);
          resolve(true);
        },
        fatal: () => {
          this.lanes = this.lanes.filter((l) => l !== lane);
          lane.worker.terminate();
          resolve(false);
        },
      });
      lane.worker.postMessage({ type: "init", ...this.options, numThreads: 1 } satisfies WorkerRequest);
    });
  }

  private sendEmbedding(lane: Lane): void {
    const { imageId, fp16 } = this.embedding!;
    lane.imageId = -1; // until the worker confirms this image
    const copy = fp16.slice(0);
    lane.worker.postMessage({ type: "embedding", imageId, fp16: copy } satisfies WorkerRequest, [copy]);
  }

  private pump(): void {
    const main = this.lanes[0];
    if (this.waiting.click && !main.running) {
      this.start(main, this.waiting.click);
      this.waiting.click = null;
    }
    const hover = this.waiting.hover;
    if (!hover) return;
    // The main worker when idle (all its threads: the shortest wait for one preview), else the hover worker.
    const idleMain = !main.running && !this.waiting.click ? main : null;
    const lane = idleMain ?? this.lanes.find((l) => !l.clicks && l.ready && !l.running && l.imageId === hover.job.imageId);
    if (!lane) return;
    this.waiting.hover = null;
    this.start(lane, hover);
  }

  private start(lane: Lane, next: Waiting): void {
    const id = this.nextId++;
    lane.running = { ...next, id, followers: [] };
    const { kind: _kind, ...inputs } = next.job;
    const req: DecodeRequest = { type: "decode", id, ...inputs };
    lane.worker.postMessage(req satisfies WorkerRequest);
  }

  private finish(lane: Lane, id: number, out: DecodeResult | null, error: Error | null): void {
    const run = lane.running;
    if (!run || run.id !== id) return;
    lane.running = null;
    if (error) run.reject(error);
    else if (run.job.kind === "hover" && run.seq < this.shownHover) run.settle(null); // a newer preview is out
    else {
      if (run.job.kind === "hover") this.shownHover = run.seq;
      run.settle(out);
    }
    // Followers (a click on the hovered point) get the same output, or retry on error.
    for (const f of run.followers) f(error ? null : out);
    this.pump();
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
