/** The page's side of mask.worker.ts: low-res logits -> full-resolution COCO RLE, as a promise. */
import type { Guide } from "./edge_snap";
import type { Rle } from "./types";

export type MaskRequest = EncodeRequest | ImagePixels;

/** The open image's pixels (RGBA, transferred) and the guide the page made of them, kept by the worker to
 * snap masks' edges. */
export interface ImagePixels {
  type: "image";
  imageId: number;
  pixels: Uint8ClampedArray;
  height: number;
  width: number;
  guide: Guide;
}

export interface EncodeRequest {
  type: "encode";
  id: number;
  /** One token's [256 x 256] logits (transferred). */
  lowRes: Float32Array;
  height: number;
  width: number;
  /** Positive clicks (image pixels): keep only the mask's regions that hold one ("clicked regions"); absent: the whole mask. */
  positives?: [number, number][];
  /** Snap the mask's edges to the image of this id ("snap edges"; its pixels sent by `setImage`); absent: SAM's postprocessing. */
  snapImageId?: number;
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

  /** Hands the worker an image's RGBA pixels (transferred) and their guide for `encode`'s `snapImageId`. */
  setImage(imageId: number, pixels: Uint8ClampedArray, height: number, width: number, guide: Guide): void {
    const req: ImagePixels = { type: "image", imageId, pixels, height, width, guide };
    this.worker.postMessage(req, [pixels.buffer]);
  }

  /**
   * SAM's postprocessing of `lowRes` to height x width (or, with `snapImageId`, its edges snapped to that
   * image: edge_snap.ts), encoded as pycocotools does; with `positives` (image pixels), only the regions
   * that hold one of them (mask_regions.ts).
   */
  encode(lowRes: Float32Array, height: number, width: number, positives?: [number, number][], snapImageId?: number): Promise<Rle> {
    const id = this.nextId++;
    const copy = lowRes.slice();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const req: EncodeRequest = { type: "encode", id, lowRes: copy, height, width, positives, snapImageId };
      this.worker.postMessage(req, [copy.buffer]);
    });
  }
}
