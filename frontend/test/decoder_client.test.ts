import { afterEach, describe, expect, it, vi } from "vitest";
import { DecoderClient, type DecodeJob } from "../src/decoder_client";
import { encodePromptInputs, type WorkerRequest } from "../src/worker_protocol";

/** A stand-in Worker that records decode requests and answers only when told to. */
class FakeWorker {
  static last: FakeWorker;
  static all: FakeWorker[] = [];
  onmessage: ((e: { data: unknown }) => void) | null = null;
  onerror: ((e: unknown) => void) | null = null;
  sent: WorkerRequest[] = [];
  terminated = false;
  constructor() {
    FakeWorker.last = this;
    FakeWorker.all.push(this);
  }
  postMessage(msg: WorkerRequest) {
    this.sent.push(msg);
    if (msg.type === "init") queueMicrotask(() => this.onmessage?.({ data: { type: "ready", backend: "wasm", numThreads: msg.numThreads } }));
    if (msg.type === "embedding" && !this.holdEmbeddings) this.confirm(msg.imageId);
  }
  /** Embeddings wait for confirm() instead of being confirmed at once. */
  holdEmbeddings = false;
  confirm(imageId: number) {
    queueMicrotask(() => this.onmessage?.({ data: { type: "embedding-ready", imageId } }));
  }
  terminate() {
    this.terminated = true;
  }
  /** Answer every decode by itself, after a macrotask, as taking this long. */
  auto(decodeMs: number) {
    const post = this.postMessage.bind(this);
    this.postMessage = (msg: WorkerRequest) => {
      post(msg);
      if (msg.type === "decode") setTimeout(() => this.answer(msg.id, msg.coords[0], decodeMs), 0);
    };
  }
  decodes() {
    return this.sent.filter((m) => m.type === "decode") as Extract<WorkerRequest, { type: "decode" }>[];
  }
  answer(id: number, mark = 0, decodeMs = 1) {
    const z = new Float32Array(4).fill(mark);
    this.onmessage?.({
      data: { type: "result", id, iou: z, areas: z, display: new Uint8Array(4), displayH: 1, displayW: 1, lowRes: new Float32Array(4), decodeMs },
    });
  }
  /** Answer as the hover graph does: one mask, of the given token. */
  answerPreview(id: number, token: number) {
    this.onmessage?.({
      data: { type: "preview", id, token, iou: new Float32Array(4), display: new Uint8Array([255]), displayH: 1, displayW: 1, decodeMs: 1 },
    });
  }
}

/** A stand-in for a worker that has the hover graph. */
class PreviewWorker extends FakeWorker {
  postMessage(msg: WorkerRequest) {
    if (msg.type !== "init") return super.postMessage(msg);
    this.sent.push(msg);
    queueMicrotask(() => this.onmessage?.({ data: { type: "ready", backend: "wasm", numThreads: msg.numThreads, fastPath: true, previewGraph: true } }));
  }
}

function job<K extends "hover" | "click">(kind: K, x: number): DecodeJob & { kind: K } {
  const { coords, labels } = encodePromptInputs([[x, x]], [1], null);
  return { kind, imageId: 1, coords, labels, maskInput: null, origHw: [10, 10] };
}

afterEach(() => {
  vi.unstubAllGlobals();
  FakeWorker.all = [];
});

describe("decoder client scheduling", () => {
  function client() {
    vi.stubGlobal("Worker", FakeWorker);
    return new DecoderClient({ modelUrl: "/m", fastPath: null, backend: "wasm", numThreads: 1, wasmPaths: "/ort/", style: "trimask" });
  }

  it("runs one decode at a time and keeps only the latest waiting hover", async () => {
    const c = client();
    const w = FakeWorker.last;
    const first = c.decode(job("hover", 1));
    const stale = c.decode(job("hover", 2));
    const latest = c.decode(job("hover", 3));
    expect(w.decodes().length).toBe(1);
    expect(await stale).toBeNull();
    w.answer(w.decodes()[0].id);
    expect(await first).not.toBeNull();
    expect(w.decodes().length).toBe(2);
    expect(w.decodes()[1].coords[0]).toBe(3);
    w.answer(w.decodes()[1].id);
    expect(await latest).not.toBeNull();
  });

  it("a click drops the waiting hover and runs next", async () => {
    const c = client();
    const w = FakeWorker.last;
    void c.decode(job("hover", 1));
    const hover = c.decode(job("hover", 2));
    const click = c.decode(job("click", 9));
    expect(await hover).toBeNull();
    w.answer(w.decodes()[0].id);
    await Promise.resolve();
    expect(w.decodes()[1].coords[0]).toBe(9);
    w.answer(w.decodes()[1].id);
    expect(await click).not.toBeNull();
    expect(w.decodes().length).toBe(2);
  });
});

describe("decoder client sharing", () => {
  it("a click on the point the running hover decodes shares its output instead of decoding again", async () => {
    vi.stubGlobal("Worker", FakeWorker);
    const c = new DecoderClient({ modelUrl: "/m", fastPath: null, backend: "wasm", numThreads: 1, wasmPaths: "/ort/", style: "trimask" });
    const w = FakeWorker.last;
    const hover = c.decode(job("hover", 4));
    const click = c.decode(job("click", 4));
    w.answer(w.decodes()[0].id);
    const [h, k] = await Promise.all([hover, click]);
    expect(h!.full).not.toBeNull();
    expect(k).toBe(h!.full);
    expect(w.decodes().length).toBe(1);
  });

  it("a hover without the hover graph previews the best candidate of the full output", async () => {
    vi.stubGlobal("Worker", FakeWorker);
    const c = new DecoderClient({ modelUrl: "/m", fastPath: null, backend: "wasm", numThreads: 1, wasmPaths: "/ort/", style: "trimask" });
    const w = FakeWorker.last;
    const hover = c.decode(job("hover", 4));
    expect(w.decodes()[0].preview).toBe(true);
    // Token 2 scores best among the multimask tokens 1..3 (token 0, the single mask, is higher but never previewed).
    const iou = new Float32Array([0.99, 0.5, 0.8, 0.6]);
    const display = new Uint8Array([0, 1, 2, 3].flatMap((t) => [t, t]));
    w.onmessage?.({ data: { type: "result", id: w.decodes()[0].id, iou, areas: new Float32Array([0.1, 0.2, 0.3, 0.4]), display, displayH: 1, displayW: 2, lowRes: new Float32Array(4), decodeMs: 1 } });
    const preview = (await hover)!;
    expect(preview.token).toBe(2);
    expect([...preview.display]).toEqual([2, 2]);
    expect([preview.displayH, preview.displayW]).toEqual([1, 2]);
  });
});

describe("decoder client with the hover graph", () => {
  function client() {
    vi.stubGlobal("Worker", PreviewWorker);
    const c = new DecoderClient({ modelUrl: "/m", fastPath: null, backend: "wasm", numThreads: 1, wasmPaths: "/ort/", style: "trimask" });
    return { c, w: FakeWorker.last };
  }

  it("asks for previews for hovers only, and passes the graph's one mask on", async () => {
    const { c, w } = client();
    expect((await c.ready()).previewGraph).toBe(true);
    const hover = c.decode(job("hover", 1));
    w.answerPreview(w.decodes()[0].id, 3);
    const preview = (await hover)!;
    expect(preview.token).toBe(3);
    expect(preview.full).toBeNull();
    const click = c.decode(job("click", 1));
    expect(w.decodes().map((d) => d.preview)).toEqual([true, false]);
    w.answer(w.decodes()[1].id, 7);
    expect((await click)!.iou[0]).toBe(7);
  });

  it("a click on the point the running hover previews decodes itself: a preview has one mask, a click shows three", async () => {
    const { c, w } = client();
    await c.ready();
    const hover = c.decode(job("hover", 4));
    const click = c.decode(job("click", 4));
    expect(w.decodes().length).toBe(1);
    w.answerPreview(w.decodes()[0].id, 1);
    expect((await hover)!.token).toBe(1);
    await Promise.resolve();
    expect(w.decodes().length).toBe(2);
    expect(w.decodes()[1]).toMatchObject({ preview: false });
    expect(w.decodes()[1].coords[0]).toBe(4);
    w.answer(w.decodes()[1].id, 5);
    const out = (await click)!;
    expect(out.iou[0]).toBe(5);
    expect(out.lowRes).toBeDefined();
  });
});

const tick = () => new Promise((r) => setTimeout(r, 0));

/** A two-thread client whose one-thread workers (this many) are up, all holding image 1's embedding; its workers, main first. */
async function withOneThreadWorkers(n: number) {
  vi.stubGlobal("Worker", FakeWorker);
  const c = new DecoderClient({ modelUrl: "/m", fastPath: null, backend: "wasm", numThreads: 2, wasmPaths: "/ort/", style: "trimask", oneThreadWorkers: n });
  await c.ready();
  expect(await c.oneThreadWorkersReady()).toBe(n);
  await c.setEmbedding(1, new ArrayBuffer(8));
  await tick();
  return { c, workers: FakeWorker.all };
}

describe("decoder client with a second worker", () => {
  async function twoWorkers() {
    const { c, workers: [main, second] } = await withOneThreadWorkers(1);
    return { c, main, second };
  }

  it("starts the second worker with one thread and gives it its own copy of the embedding", async () => {
    const { main, second } = await twoWorkers();
    const init = (w: FakeWorker) => w.sent.find((m) => m.type === "init") as Extract<WorkerRequest, { type: "init" }>;
    expect([init(main).numThreads, init(second).numThreads]).toEqual([2, 1]);
    const embeddings = [main, second].map((w) => w.sent.find((m) => m.type === "embedding") as Extract<WorkerRequest, { type: "embedding" }>);
    expect(embeddings.map((m) => m.imageId)).toEqual([1, 1]);
    expect(embeddings[0].fp16).not.toBe(embeddings[1].fp16);
  });

  it("gives the second worker a new image only after the main one has it", async () => {
    const { c, second } = await twoWorkers();
    const embedded = c.setEmbedding(2, new ArrayBuffer(8));
    expect(second.sent.filter((m) => m.type === "embedding").length).toBe(1); // not yet: the main one prepares first
    await embedded;
    await tick();
    expect(second.sent.filter((m) => m.type === "embedding").map((m) => (m as { imageId: number }).imageId)).toEqual([1, 2]);
  });

  it("runs one real decode at a time across both workers, latest hover winning", async () => {
    const { c, main, second } = await twoWorkers();
    const first = c.decode(job("hover", 1));
    const stale = c.decode(job("hover", 2));
    const latest = c.decode(job("hover", 3));
    expect(main.decodes().length + second.decodes().length).toBe(1);
    expect(await stale).toBeNull();
    main.answer(main.decodes()[0].id, 1);
    expect((await first)!.iou[0]).toBe(1);
    const sent = [...main.decodes(), ...second.decodes()].filter((d) => d.coords[0] === 3);
    expect(sent.length).toBe(1);
    (main.decodes().includes(sent[0]) ? main : second).answer(sent[0].id, 3);
    expect((await latest)!.iou[0]).toBe(3);
  });

  it("learns which worker is faster alone (probing in the background) and sends clicks there", async () => {
    for (const [mainMs, secondMs, expected] of [[100, 40, "second"], [40, 100, "main"]] as const) {
      FakeWorker.all = [];
      const { c, main, second } = await twoWorkers();
      main.auto(mainMs);
      second.auto(secondMs);
      const busy: number[] = [];
      c.onBusy = (n) => busy.push(n);
      const taken: string[] = [];
      for (let i = 1; i <= 10; i++) {
        const [m, s2] = [main.decodes().length, second.decodes().length];
        const out = await c.decode(job("click", i));
        expect(out!.iou[0]).toBe(i);
        taken.push(main.decodes().length > m && main.decodes()[m].coords[0] === i ? "main" : second.decodes().length > s2 && second.decodes()[s2].coords[0] === i ? "second" : "?");
        for (let k = 0; k < 4; k++) await tick(); // probes run while idle
      }
      expect(taken.slice(-4)).toEqual([expected, expected, expected, expected]);
      expect(busy.at(-1)).toBe(0);
    }
  });

  it("a probe never delays a click: the click takes the idle worker, and the probe's output reaches nobody", async () => {
    const { c, main, second } = await twoWorkers();
    const first = c.decode(job("click", 1));
    main.answer(main.decodes()[0].id, 1, 100);
    expect((await first)!.iou[0]).toBe(1);
    // Idle, the main worker not measured yet (its first decode was cold): it decodes the latest job again.
    expect(main.decodes().map((d) => d.coords[0])).toEqual([1, 1]);
    const click = c.decode(job("click", 2));
    expect(second.decodes().map((d) => d.coords[0])).toEqual([2]);
    main.answer(main.decodes()[1].id, 9, 100);
    second.answer(second.decodes()[0].id, 2, 100);
    expect((await click)!.iou[0]).toBe(2);
  });

  it("without the option there is one worker", async () => {
    vi.stubGlobal("Worker", FakeWorker);
    const c = new DecoderClient({ modelUrl: "/m", fastPath: null, backend: "wasm", numThreads: 2, wasmPaths: "/ort/", style: "trimask" });
    await c.ready();
    expect(await c.oneThreadWorkersReady()).toBe(0);
    expect(FakeWorker.all.length).toBe(1);
  });
});

describe("decoder client with a pair of one-thread workers", () => {
  async function threeWorkers() {
    const { c, workers: [main, a, b] } = await withOneThreadWorkers(2);
    return { c, main, a, b };
  }
  const running = (...ws: FakeWorker[]) => ws.map((w) => w.decodes().map((d) => d.coords[0]));

  it("the one-thread workers prepare a new image after the main one, one at a time", async () => {
    const { c, main, a, b } = await threeWorkers();
    const embeddings = (w: FakeWorker) => w.sent.filter((m) => m.type === "embedding").map((m) => (m as { imageId: number }).imageId);
    for (const w of [main, a, b]) w.holdEmbeddings = true;
    const ready = c.setEmbedding(2, new ArrayBuffer(8));
    expect([embeddings(a), embeddings(b)]).toEqual([[1], [1]]);
    main.confirm(2);
    await ready;
    expect([embeddings(a), embeddings(b)]).toEqual([[1, 2], [1]]);
    a.confirm(2);
    await tick();
    expect([embeddings(a), embeddings(b)]).toEqual([[1, 2], [1, 2]]);
    // Switched again while b prepares image 2: a gets image 3 only once b is done.
    const again = c.setEmbedding(3, new ArrayBuffer(8));
    main.confirm(3);
    await again;
    expect([embeddings(a), embeddings(b)]).toEqual([[1, 2], [1, 2]]);
    b.confirm(2);
    await tick();
    expect([embeddings(a), embeddings(b)]).toEqual([[1, 2, 3], [1, 2]]);
  });

  /** Starts a moving pointer's stream of previews: the first (after rest) on the main worker, the next on the pair. */
  async function stream(c: DecoderClient, main: FakeWorker) {
    const first = c.decode(job("hover", 1));
    expect(main.decodes().map((d) => d.coords[0])).toEqual([1]);
    const superseded = c.decode(job("hover", 2));
    const next = c.decode(job("hover", 3)); // waits: nothing decodes beside the main worker
    expect(await superseded).toBeNull();
    main.answer(main.decodes()[0].id, 1);
    expect((await first)!.iou[0]).toBe(1);
    return { next };
  }

  it("previews a moving pointer on the two one-thread workers side by side, and never goes back in time", async () => {
    const { c, main, a, b } = await threeWorkers();
    const init = (w: FakeWorker) => (w.sent.find((m) => m.type === "init") as Extract<WorkerRequest, { type: "init" }>).numThreads;
    expect([main, a, b].map(init)).toEqual([2, 1, 1]);
    const { next: h3 } = await stream(c, main);
    const h4 = c.decode(job("hover", 4));
    const h5 = c.decode(job("hover", 5));
    expect(running(main, a, b)).toEqual([[1], [3], [4]]); // 5 waits for a free one
    b.answer(b.decodes()[0].id, 4);
    expect((await h4)!.iou[0]).toBe(4);
    expect(running(main, a, b)).toEqual([[1], [3], [4, 5]]);
    a.answer(a.decodes()[0].id, 3); // older than the preview already shown: dropped
    expect(await h3).toBeNull();
    b.answer(b.decodes()[1].id, 5);
    expect((await h5)!.iou[0]).toBe(5);
  });

  it("a hover after the pointer rested goes to the fastest worker alone", async () => {
    const { c, main, a, b } = await threeWorkers();
    await stream(c, main);
    a.answer(a.decodes()[0].id, 3);
    await new Promise((r) => setTimeout(r, 150)); // longer than STREAM_GAP_MS
    expect(running(main, a, b)).toEqual([[1, 3], [3], []]); // idle: the main worker, not measured yet, is probed
    main.answer(main.decodes()[1].id, 3);
    void c.decode(job("hover", 6));
    void c.decode(job("hover", 7)); // waits for the main worker: the stream starts again after it
    expect(running(main, a, b)).toEqual([[1, 3, 6], [3], []]);
  });

  it("a click waits for the pair's previews, then decodes alone on the main worker", async () => {
    const { c, main, a, b } = await threeWorkers();
    await stream(c, main);
    void c.decode(job("hover", 4));
    const click = c.decode(job("click", 9));
    expect(running(main, a, b)).toEqual([[1], [3], [4]]);
    a.answer(a.decodes()[0].id, 3);
    await Promise.resolve();
    expect(running(main)).toEqual([[1]]); // b still previews
    b.answer(b.decodes()[0].id, 4);
    await Promise.resolve();
    expect(running(main, a, b)).toEqual([[1, 9], [3], [4]]);
    void c.decode(job("hover", 5)); // waits: nothing decodes beside a click
    expect(running(a, b)).toEqual([[3], [4]]);
    main.answer(main.decodes()[1].id, 9);
    expect((await click)!.iou[0]).toBe(9);
  });

  it("starts the pair's decodes half a decode apart, so previews come evenly spaced", async () => {
    const { c, main, a, b } = await threeWorkers();
    const { next: h3 } = await stream(c, main);
    a.answer(a.decodes()[0].id, 3, 80); // one-thread decodes take 80 ms
    await h3;
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "performance"] });
    try {
      void c.decode(job("hover", 4));
      expect(running(a, b)).toEqual([[3, 4], []]);
      vi.advanceTimersByTime(10);
      void c.decode(job("hover", 5));
      expect(running(b)).toEqual([[]]);
      vi.advanceTimersByTime(29); // 39 ms after the other started
      expect(running(b)).toEqual([[]]);
      vi.advanceTimersByTime(1); // 40: half of 80
      expect(running(b)).toEqual([[5]]);
    } finally {
      vi.useRealTimers();
    }
  });

  it("previews a moving pointer on the main worker when it is more than twice as fast alone, on the pair otherwise", async () => {
    for (const [mainMs, oneMs, expected] of [[30, 90, "main"], [60, 90, "pair"]] as const) {
      FakeWorker.all = [];
      const { c, main, a, b } = await threeWorkers();
      main.auto(mainMs);
      a.auto(oneMs);
      b.auto(oneMs);
      // Clicks warm the main worker up and probes measure the others while idle.
      for (let i = 1; i <= 16; i++) {
        await c.decode(job("click", 100 + i));
        for (let k = 0; k < 4; k++) await tick();
      }
      const taken: string[] = [];
      for (let i = 1; i <= 5; i++) {
        const before = main.decodes().length;
        const out = await c.decode(job("hover", i)); // each within STREAM_GAP_MS of the last
        expect(out!.iou[0]).toBe(i);
        taken.push(main.decodes().slice(before).some((d) => d.coords[0] === i) ? "main" : "pair");
      }
      expect(taken.slice(1)).toEqual([expected, expected, expected, expected]);
    }
  });
});

describe("prompt encoding", () => {
  it("adds SAM's padding point when there is no box", () => {
    const { coords, labels } = encodePromptInputs([[1, 2]], [1], null);
    expect(Array.from(coords)).toEqual([1, 2, 0, 0]);
    expect(Array.from(labels)).toEqual([1, -1]);
  });

  it("appends the box corners with labels 2 and 3 and no padding point", () => {
    const { coords, labels } = encodePromptInputs([[1, 2]], [0], [3, 4, 5, 6]);
    expect(Array.from(coords)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(labels)).toEqual([0, 2, 3]);
  });
});
