/** The page's side of mask.worker.ts: low-res logits -> full-resolution COCO RLE, as a promise. */
import type { Rle } from "./types";

export interface MaskRequest {
  id: number;
  /** One token's [256 x 256] logits (transferred). */
  lowRes: Float32Array;
  height: number;
  width: number;
  /** Positive clicks (image pixels): keep only the mask's regions that hold one ("clicked regions"); absent: the whole mask. */
  positives?: [number, number][];
}

export interface MaskResponse {
  id: number;
  rle: Rle | null;
  error: string | null;
}

export class MaskEncoder {
  private worker = new Worker(new URL("./mask.worker.ts", import.meta.url), { type: "module" });
  private nextId = 1;
  private pending = new Map<number, { resolve: (rle: Rle) => void; reject: (e: Error) => void }>();

  constructor() {
    this.worker.onmessage = (event: MessageEvent<MaskResponse>) => {
      const { id, rle, error } = event.data;
      const p = this.pending.get(id);
      this.pending.delete(id);
      if (!p) return;
      if (rle) p.resolve(rle);
      else p.reject(new Error(error ?? "the mask could not be encoded"));
    };
  }

  /**
   * SAM's postprocessing of `lowRes` to height x width, encoded as pycocotools does; with `positives`
   * (image pixels), only the regions that hold one of them (mask_regions.ts).
   */
  encode(lowRes: Float32Array, height: number, width: number, positives?: [number, number][]): Promise<Rle> {
    const id = this.nextId++;
    const copy = lowRes.slice();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const req: MaskRequest = { id, lowRes: copy, height, width, positives };
      this.worker.postMessage(req, [copy.buffer]);
    });
  }
}
