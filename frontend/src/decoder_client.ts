/**
 * The page's side of the decoder workers. While a decode runs, newer requests
 * replace older waiting ones (latest wins), so a moving mouse never builds a
 * queue of stale hover decodes and a click never waits behind them.
 *
 * Optionally one-thread workers stand beside the main one (which has all the
 * threads). Each click goes to the worker that has lately been faster: on an
 * idle machine the main one, but when other work holds a core one thread beats
 * two (the threads of one decode wait for each other), by up to 2x here. A
 * worker's time is the median of its latest decodes (warmed up: see WARM_UP);
 * a worker not measured lately gets a background decode (a probe) while
 * all is idle, which a click or hover never waits for: it takes another worker.
 * A click never decodes beside another decode: a two-thread and a one-thread
 * decode side by side slow each other down more than they gain (measured).
 *
 * With two one-thread workers, hover previews while the pointer keeps moving run
 * on those two side by side (a "pair"), each starting on the pointer's latest
 * point as soon as one is free: two one-thread decodes at once give more
 * previews per second than one two-thread decode at a time (measured here: 20 vs
 * 15-17 a second), at the cost of each preview's latency (one thread's decode
 * time). The two start half a decode apart, so previews come evenly spaced, not
 * two at once. A hover after the pointer rested (no preview for STREAM_GAP_MS)
 * goes to the fastest worker alone, as a click does. The pair is used
 * while a one-thread decode alone takes less than PAIR_BREAK_EVEN times the
 * main worker's (with more cores the main worker alone previews faster). A
 * preview that finishes after a newer one is dropped, so previews never go back
 * in time; the main worker never decodes beside the pair.
 *
 * A hover asks only for a preview (the best multimask candidate's mask): a worker with the hover
 * graph computes just that, otherwise the best candidate is taken from the full output (which the
 * preview then carries, so a click there can use it).
 */
import { LOW_RES } from "./mask_postprocess";
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
  /** One-thread workers (0, 1 or 2) started once the main one is ready. */
  oneThreadWorkers?: number;
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
  const frame = LOW_RES * LOW_RES;
  const lowRes = out.lowRes.subarray(token * frame, (token + 1) * frame);
  return { token, iou: out.iou, display, displayH: out.displayH, displayW: out.displayW, lowRes, lowResW: LOW_RES, decodeMs: out.decodeMs, full: out };
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
  /** performance.now() when it was sent. */
  startedAt: number;
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
/**
 * Two one-thread decodes side by side each take about 6% longer than alone (measured in Node),
 * so the pair outpaces the main worker while a one-thread decode alone takes less than this
 * many times the main one's (2 / 1.06, rounded down).
 */
const PAIR_BREAK_EVEN = 1.8;
/** Hovers within this many ms of the last preview's decode are a moving pointer's: the pair takes them. */
const STREAM_GAP_MS = 100;

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
  /** Its latest decode's time (ms), alone or not. */
  lastMs: number | null = null;

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
  /** The id of the latest hover decode whose preview was handed out: an older one finishing later is dropped. */
  private lastPreviewId = 0;
  /** performance.now() when the latest hover decode finished. */
  private lastHoverEnd = -Infinity;
  /** A pump() waiting for the pair's stagger. */
  private pumpTimer: ReturnType<typeof setTimeout> | null = null;
  private waiting: { click: Waiting | null; hover: Waiting | null } = { click: null, hover: null };
  /** The latest real job, replayed by probes. */
  private lastJob: DecodeJob | null = null;
  private readyPromise: Promise<ReadyInfo>;
  private extraReadyPromise: Promise<number>;
  private embeddingWaiters = new Map<number, () => void>();
  /** The current image's embedding, kept for the one-thread workers (they get it once the main one has it). */
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
    const extra = Math.max(0, Math.min(2, options.oneThreadWorkers ?? 0));
    this.extraReadyPromise = this.readyPromise.then(
      async () => (await Promise.all(Array.from({ length: extra }, () => this.startOneThreadLane()))).filter(Boolean).length,
      () => 0,
    );
  }

  ready(): Promise<ReadyInfo> {
    return this.readyPromise;
  }

  /** Resolves, once the one-thread workers are up, with how many decode (0 if none was asked for or all failed). */
  oneThreadWorkersReady(): Promise<number> {
    return this.extraReadyPromise;
  }

  /** Hands the image's float16 embedding to the workers; resolves once the main worker has it in place. */
  setEmbedding(imageId: number, fp16: ArrayBuffer): Promise<void> {
    if (this.options.oneThreadWorkers) this.embedding = { imageId, fp16: fp16.slice(0) };
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
        }
        this.prepareNext();
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

  /** A one-thread worker; a failure only leaves the others doing everything. */
  private startOneThreadLane(): Promise<boolean> {
    return new Promise((resolve) => {
      const lane = this.addLane(false, {
        ready: () => {
          this.prepareNext();
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

  /**
   * The one-thread workers prepare the main worker's image after it, one at a time, so they never
   * delay it and hold one core at most (an image switched back and forth is ready again sooner).
   */
  private prepareNext(): void {
    if (!this.embedding || this.lanes[0].imageId !== this.embedding.imageId) return;
    const others = this.lanes.slice(1);
    if (others.some((l) => l.preparing)) return;
    const next = others.find((l) => l.ready && l.imageId !== this.embedding!.imageId);
    if (next) this.sendEmbedding(next, this.embedding);
  }

  private sendEmbedding(lane: Lane, { imageId, fp16 }: { imageId: number; fp16: ArrayBuffer }): void {
    lane.imageId = -1; // until the worker confirms this image
    lane.preparing = true; // work beside any decode: that decode measures nothing
    for (const l of this.lanes) if (l.running) l.running.alone = false;
    this.onBusy(this.busyCount());
    const copy = fp16.slice(0);
    lane.worker.postMessage({ type: "embedding", imageId, fp16: copy } satisfies WorkerRequest, [copy]);
  }

  /**
   * Idle workers for a job on this image, fastest first (unmeasured: the main worker first). The
   * main worker always qualifies (the page decodes only once setEmbedding resolved); a one-thread
   * one once it has confirmed this image.
   */
  private idleFor(imageId: number): Lane[] {
    const time = (l: Lane) => l.ms ?? (l.main ? -1 : Infinity);
    return this.lanes
      .filter((l) => !l.running && (l.main || (l.ready && l.imageId === imageId)))
      .sort((a, b) => time(a) - time(b));
  }

  private pump(): void {
    // A waiting click goes before a waiting hover.
    const next = this.waiting.click ?? this.waiting.hover;
    const lane = next && this.laneFor(next.job);
    if (next && lane) {
      this.waiting[next.job.kind] = null;
      this.start(lane, next, false);
    }
    this.probe();
  }

  /** Where a job starts now, if anywhere: one real decode at a time, but for hovers on the pair. */
  private laneFor(job: DecodeJob): Lane | undefined {
    const busy = this.lanes.filter((l) => l.running && !l.running.probe);
    const idle = this.idleFor(job.imageId);
    const streaming = busy.length > 0 || performance.now() - this.lastHoverEnd < STREAM_GAP_MS;
    if (job.kind === "hover" && streaming && this.pairFor(job.imageId)) {
      if (busy.some((l) => l.main || l.running!.job.kind === "click")) return undefined;
      const free = idle.find((l) => !l.main);
      const other = busy[0]; // the pair's other worker, previewing
      const typical = other?.ms ?? other?.lastMs;
      if (free && other && typical) {
        const wait = other.running!.startedAt + typical / 2 - performance.now();
        if (wait > 0) {
          this.pumpTimer ??= setTimeout(() => {
            this.pumpTimer = null;
            this.pump();
          }, wait);
          return undefined;
        }
      }
      return free;
    }
    return busy.length ? undefined : idle[0];
  }

  /** Whether hovers on this image run on the two one-thread workers side by side (see the module comment). */
  private pairFor(imageId: number): boolean {
    const pair = this.lanes.filter((l) => !l.main && l.ready && l.imageId === imageId);
    if (pair.length < 2) return false;
    const main = this.lanes[0].ms;
    const one = Math.max(pair[0].ms ?? 0, pair[1].ms ?? 0);
    return main === null || one === 0 || one < PAIR_BREAK_EVEN * main;
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
    lane.running = { ...next, id, followers: [], alone: others.length === 0, probe, startedAt: performance.now() };
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
    if (out) lane.lastMs = out.decodeMs;
    let own = out;
    if (run.job.kind === "hover" && !run.probe) {
      this.lastHoverEnd = performance.now();
      if (out && id < this.lastPreviewId) own = null; // a newer preview is showing already
      else if (out) this.lastPreviewId = id;
    }
    if (error) run.reject(error);
    else run.settle(own);
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
