/**
 * The page's side of the decoder workers. One decode runs at a time; while it
 * runs, newer requests replace older waiting ones (latest wins), so a moving
 * mouse never builds a queue of stale hover decodes and a click never waits
 * behind them.
 *
 * Optionally a second, one-thread worker stands beside the main one (which has
 * all the threads), and each job goes to the one that has lately been faster: on
 * an idle machine the main one, but when other work holds a core one thread beats
 * two (the threads of one decode wait for each other), by up to 2x here. A
 * worker's time is the median of its latest decodes (warmed up: see WARM_UP);
 * a worker not measured lately gets a background decode (a probe) while
 * all is idle, which a click or hover never waits for: it takes the other worker.
 * The two never decode real jobs at once: a two-thread and a one-thread decode
 * side by side slow each other down more than they gain (measured).
 *
 * A hover asks only for a preview (the best multimask candidate's mask): a worker with the hover
 * graph computes just that, otherwise the best candidate is taken from the full output (which the
 * preview then carries, so a click there can use it).
 */
import { bestCandidate, candidatesFor, type DecodeOutput } from "./session";
import type { DecodeRequest, DecoderStyle, ExecutionBackend, FastPathUrls, Preview, PromptInputs, WorkerMessage, WorkerRequest } from "./worker_protocol";

export type DecodeKind = "hover" | "click";

export interface DecodeJob extends PromptInputs {
  kind: DecodeKind;
}

export interface DecoderOptions {
  modelUrl: string;
  fastPath: FastPathUrls | null;
  backend: ExecutionBackend;
  numThreads: number;
  wasmPaths: string;
  style: DecoderStyle;
  /** Start a second, one-thread worker once the main one is ready. */
  secondWorker?: boolean;
}

export interface ReadyInfo {
  backend: ExecutionBackend;
  numThreads: number;
  fastPath: boolean;
  /** Hovers run the hover graph (one mask per preview). */
  previewGraph: boolean;
}

export type DecodeResult = DecodeOutput & { decodeMs: number };

/** A hover's answer; `full` is the whole output when the preview was taken from one (no hover graph). */
export type PreviewResult = Preview & { decodeMs: number; full: DecodeResult | null };

type Answer = DecodeResult | PreviewResult;

export function isPreview(out: Answer): out is PreviewResult {
  return "token" in out;
}

/** A hover's preview from any answer: the best multimask candidate, as the page would preselect it. */
export function toPreview(out: Answer): PreviewResult {
  if (isPreview(out)) return out;
  const candidates = candidatesFor(out, true);
  const token = candidates[bestCandidate(candidates)].token;
  const pixels = out.displayH * out.displayW;
  const display = out.display.subarray(token * pixels, (token + 1) * pixels);
  return { token, iou: out.iou, display, displayH: out.displayH, displayW: out.displayW, decodeMs: out.decodeMs, full: out };
}

/** Resolved with the output, or null when a newer request superseded this one. */
type Settle = (out: Answer | null) => void;

interface Waiting {
  job: DecodeJob;
  settle: Settle;
  reject: (e: Error) => void;
}

interface Running extends Waiting {
  id: number;
  /** Clicks with the same prompt, answered with this decode's full output. */
  followers: Waiting[];
  /** No other worker decoded at any time during this one: its time measures this worker. */
  alone: boolean;
  probe: boolean;
}

/** A worker's time: the median of its latest alone-decodes, this many. */
const SAMPLES = 3;
/**
 * A worker not measured during this many measured decodes (of any worker) is probed again, at
 * most one probe per this many decodes; a worker with fewer than two samples, after two decodes.
 */
const STALE_AFTER = 12;
const FIRST_PROBES_AFTER = 2;
/**
 * A worker's first decodes run code the browser has not optimized yet (up to 3x slower): the
 * second worker runs WARM_UP decodes before it is ready, and the main one's first MAIN_WARM_UP
 * decodes are not samples (measured: the two-thread worker takes about 8 to settle).
 */
const WARM_UP = 4;
const MAIN_WARM_UP = 8;

/** One worker and what it holds. */
class Lane {
  running: Running | null = null;
  /** Its hover previews come from the hover graph (one mask, not the full output). */
  previewGraph = false;
  /** The image whose embedding this worker holds (confirmed by the worker). */
  imageId = -1;
  ready = false;
  /** Between handing it an embedding and its confirmation: it computes the per-image tensors. */
  preparing = false;
  /** Its latest alone-decode times (ms, warmed up) and the alone-decode count when last measured; its decodes so far. */
  samples: number[] = [];
  measuredAt = -Infinity;
  decodes = 0;

  /** Typical ms of a decode run alone, or null before any sample. */
  get ms(): number | null {
    if (!this.samples.length) return null;
    const sorted = [...this.samples].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  }

  constructor(
    readonly worker: Worker,
    readonly main: boolean,
  ) {}
}

function newWorker(): Worker {
  return new Worker(new URL("./decoder.worker.ts", import.meta.url), { type: "module" });
}

export class DecoderClient {
  private lanes: Lane[] = [];
  private nextId = 1;
  private aloneCount = 0;
  private decodeCount = 0;
  private lastProbe = -Infinity;
  private waiting: { click: Waiting | null; hover: Waiting | null } = { click: null, hover: null };
  /** The latest real job, replayed by probes. */
  private lastJob: DecodeJob | null = null;
  private readyPromise: Promise<ReadyInfo>;
  private secondReadyPromise: Promise<boolean>;
  private embeddingWaiters = new Map<number, () => void>();
  /** The current image's embedding, kept for the second worker (it gets it once the main one has it). */
  private embedding: { imageId: number; fp16: ArrayBuffer } | null = null;
  /** Set when init or an embedding fails; shown to the user by the controller. */
  onFatal: (message: string) => void = () => {};
  /** Told how many workers are busy (decoding, probes included, or preparing an image) at each change (for the benchmark). */
  onBusy: (running: number) => void = () => {};

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
    this.secondReadyPromise = options.secondWorker
      ? this.readyPromise.then(() => this.startSecondLane(), () => false)
      : Promise.resolve(false);
  }

  ready(): Promise<ReadyInfo> {
    return this.readyPromise;
  }

  /** Resolves true once the second worker decodes, false if there is none (or it failed). */
  secondWorkerReady(): Promise<boolean> {
    return this.secondReadyPromise;
  }

  /** Hands the image's float16 embedding to the workers; resolves once the main worker has it in place. */
  setEmbedding(imageId: number, fp16: ArrayBuffer): Promise<void> {
    if (this.options.secondWorker) this.embedding = { imageId, fp16: fp16.slice(0) };
    for (const lane of this.lanes.slice(1)) lane.imageId = -1; // until it gets and confirms this image
    return new Promise((resolve) => {
      this.embeddingWaiters.set(imageId, resolve);
      this.lanes[0].worker.postMessage({ type: "embedding", imageId, fp16 } satisfies WorkerRequest, [fp16]);
    });
  }

  /**
   * Queues a decode; a newer job of the same kind replaces it while it waits. A click drops
   * waiting hovers, and shares a running decode's full output when it asks for the same prompt
   * (the pointer hovered exactly where it then clicked), never a hover graph's one mask.
   */
  decode(job: DecodeJob & { kind: "click" }): Promise<DecodeResult | null>;
  decode(job: DecodeJob & { kind: "hover" }): Promise<PreviewResult | null>;
  decode(job: DecodeJob): Promise<Answer | null>;
  decode(job: DecodeJob): Promise<Answer | null> {
    return new Promise((resolve, reject) => {
      this.lastJob = job;
      const settle: Settle = job.kind === "hover" ? (out) => resolve(out && toPreview(out)) : resolve;
      if (job.kind === "click") {
        const same = this.lanes.find((l) => l.running && !l.running.probe && sameInputs(l.running.job, job) && givesFullOutput(l));
        if (same) {
          same.running!.followers.push({ job, settle, reject });
          return;
        }
      }
      this.waiting[job.kind]?.settle(null);
      this.waiting[job.kind] = { job, settle, reject };
      if (job.kind === "click") this.cancelHover();
      this.pump();
    });
  }

  /** Forgets waiting hover decodes (the pointer left the image or a prompt started). */
  cancelHover(): void {
    this.waiting.hover?.settle(null);
    this.waiting.hover = null;
  }

  private addLane(main: boolean, on: { ready: (info: ReadyInfo) => void; fatal: (message: string) => void }): Lane {
    const lane = new Lane(newWorker(), main);
    this.lanes.push(lane);
    lane.worker.onmessage = (event: MessageEvent<WorkerMessage>) => {
      const msg = event.data;
      if (msg.type === "ready") {
        lane.ready = true;
        lane.previewGraph = msg.previewGraph ?? false;
        on.ready({ backend: msg.backend, numThreads: msg.numThreads, fastPath: msg.fastPath, previewGraph: lane.previewGraph });
      } else if (msg.type === "embedding-ready") {
        lane.imageId = msg.imageId;
        lane.preparing = false;
        this.onBusy(this.busyCount());
        if (lane.main) {
          this.embeddingWaiters.get(msg.imageId)?.();
          this.embeddingWaiters.delete(msg.imageId);
          // The second worker prepares the image after the main one, so it never delays the main one.
          for (const other of this.lanes.slice(1)) if (other.ready) this.sendEmbedding(other);
        }
        this.pump();
      } else if (msg.type === "result") this.finish(lane, msg.id, msg, null);
      else if (msg.type === "preview") this.finish(lane, msg.id, { ...msg, full: null }, null);
      else if (msg.type === "error") {
        if (msg.id === null) on.fatal(msg.message);
        else this.finish(lane, msg.id, null, new Error(msg.message));
      }
    };
    lane.worker.onerror = (event) => on.fatal(event.message || "the decoder worker failed to start");
    return lane;
  }

  /** The one-thread second worker; a failure only leaves the main worker doing everything. */
  private startSecondLane(): Promise<boolean> {
    return new Promise((resolve) => {
      const lane = this.addLane(false, {
        ready: () => {
          if (this.embedding && this.embedding.imageId === this.lanes[0].imageId) this.sendEmbedding(lane);
          resolve(true);
        },
        fatal: () => {
          this.lanes = this.lanes.filter((l) => l !== lane);
          lane.worker.terminate();
          resolve(false);
        },
      });
      // Warmed up before it reports ready (in the background), so its first decodes already measure it.
      lane.worker.postMessage({ type: "init", ...this.options, numThreads: 1, warmUp: WARM_UP } satisfies WorkerRequest);
    });
  }

  private sendEmbedding(lane: Lane): void {
    if (!this.embedding) return;
    const { imageId, fp16 } = this.embedding;
    lane.imageId = -1; // until the worker confirms this image
    lane.preparing = true; // work beside any decode: that decode measures nothing
    for (const l of this.lanes) if (l.running) l.running.alone = false;
    this.onBusy(this.busyCount());
    const copy = fp16.slice(0);
    lane.worker.postMessage({ type: "embedding", imageId, fp16: copy } satisfies WorkerRequest, [copy]);
  }

  /**
   * Idle workers for a job on this image, fastest first (unmeasured: the main worker first). The
   * main worker always qualifies (the page decodes only once setEmbedding resolved); the second
   * one once it has confirmed this image.
   */
  private idleFor(imageId: number): Lane[] {
    const time = (l: Lane) => l.ms ?? (l.main ? -1 : Infinity);
    return this.lanes
      .filter((l) => !l.running && (l.main || (l.ready && l.imageId === imageId)))
      .sort((a, b) => time(a) - time(b));
  }

  private pump(): void {
    // One real decode at a time; a waiting click goes before a waiting hover.
    const next = this.waiting.click ?? this.waiting.hover;
    const lane = next && !this.lanes.some((l) => l.running && !l.running.probe) ? this.idleFor(next.job.imageId)[0] : undefined;
    if (next && lane) {
      this.waiting[next.job.kind] = null;
      this.start(lane, next, false);
    }
    this.probe();
  }

  /** With every worker idle and nothing waiting, decodes the latest job again on a worker not measured lately. */
  private probe(): void {
    const job = this.lastJob;
    if (!job || this.lanes.length < 2 || this.waiting.click || this.waiting.hover) return;
    if (this.lanes.some((l) => l.running || l.preparing)) return;
    const since = this.decodeCount - this.lastProbe;
    const candidates = this.lanes.filter((l) => l.ready && l.imageId === job.imageId);
    const stale =
      candidates.find((l) => l.samples.length < 2 && since >= FIRST_PROBES_AFTER) ??
      candidates.find((l) => this.aloneCount - l.measuredAt >= STALE_AFTER && since >= STALE_AFTER);
    if (!stale) return;
    this.lastProbe = this.decodeCount;
    this.start(stale, { job, settle: () => {}, reject: () => {} }, true);
  }

  private start(lane: Lane, next: Waiting, probe: boolean): void {
    const id = this.nextId++;
    const others = this.lanes.filter((l) => l.running || l.preparing);
    for (const l of others) if (l.running) l.running.alone = false;
    lane.running = { ...next, id, followers: [], alone: others.length === 0, probe };
    const { kind: _kind, ...inputs } = next.job;
    const req: DecodeRequest = { type: "decode", id, ...inputs, preview: next.job.kind === "hover" };
    lane.worker.postMessage(req satisfies WorkerRequest);
    this.onBusy(this.busyCount());
  }

  /** Decodes running (probes included) and workers preparing an image. */
  private busyCount(): number {
    return this.lanes.filter((l) => l.running || l.preparing).length;
  }

  private finish(lane: Lane, id: number, out: Answer | null, error: Error | null): void {
    const run = lane.running;
    if (!run || run.id !== id) return;
    lane.running = null;
    this.decodeCount++;
    if (out && run.alone && lane.decodes >= (lane.main ? MAIN_WARM_UP : 0)) {
      lane.samples = [...lane.samples, out.decodeMs].slice(-SAMPLES);
      lane.measuredAt = ++this.aloneCount;
    }
    lane.decodes++;
    if (error) run.reject(error);
    else run.settle(out);
    // Followers (a click on the hovered point) get the same output; without one (an error, or a
    // preview after all) they decode themselves, unless a newer click waits.
    for (const f of run.followers) {
      if (out && !isPreview(out)) f.settle(out);
      else if (this.waiting.click) f.settle(null);
      else this.waiting.click = f;
    }
    this.pump();
    this.onBusy(this.busyCount());
  }
}

/** Whether the job this worker runs gives the full output (a click, or a hover without the hover graph). */
function givesFullOutput(lane: Lane): boolean {
  return lane.running !== null && (lane.running.job.kind === "click" || !lane.previewGraph);
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
