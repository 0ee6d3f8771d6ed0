import { afterEach, describe, expect, it, vi } from "vitest";
import { DecoderClient, type DecodeJob } from "../src/decoder_client";
import { encodePromptInputs, type WorkerRequest } from "../src/worker_protocol";

/** A stand-in Worker that records decode requests and answers only when told to. */
class FakeWorker {
  static last: FakeWorker;
  onmessage: ((e: { data: unknown }) => void) | null = null;
  onerror: ((e: unknown) => void) | null = null;
  sent: WorkerRequest[] = [];
  constructor() {
    FakeWorker.last = this;
  }
  postMessage(msg: WorkerRequest) {
    this.sent.push(msg);
    if (msg.type === "init") queueMicrotask(() => this.onmessage?.({ data: { type: "ready", backend: "wasm", numThreads: 1 } }));
  }
  decodes() {
    return this.sent.filter((m) => m.type === "decode") as Extract<WorkerRequest, { type: "decode" }>[];
  }
  answer(id: number) {
    const z = new Float32Array(4);
    this.onmessage?.({
      data: { type: "result", id, iou: z, areas: z, display: new Uint8Array(4), displayH: 1, displayW: 1, lowRes: new Float32Array(4), decodeMs: 1 },
    });
  }
}

function job(kind: "hover" | "click", x: number): DecodeJob {
  const { coords, labels } = encodePromptInputs([[x, x]], [1], null);
  return { kind, imageId: 1, coords, labels, maskInput: null, origHw: [10, 10] };
}

afterEach(() => vi.unstubAllGlobals());

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
    expect(k).toBe(h);
    expect(w.decodes().length).toBe(1);
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
