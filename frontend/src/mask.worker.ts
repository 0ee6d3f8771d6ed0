/// <reference lib="webworker" />
/**
 * Turns an accepted candidate's low-res logits into its full-resolution COCO RLE off the
 * main thread (a 12-megapixel photo takes a few hundred ms, which would freeze the page).
 * With "snap edges" it keeps the open image's pixels (sent once per image) to snap the mask
 * at full resolution (edge_snap.ts).
 */
import { encodeMask } from "./coco_rle";
import { coefficients, snapFull, SNAP_LOW_RES, type Guide } from "./edge_snap";
import { postprocessLowRes } from "./mask_postprocess";
import { keepClickedRegionsFull } from "./mask_regions";
import type { MaskRequest, MaskResponse } from "./mask_encoder";

let image: { imageId: number; pixels: Uint8ClampedArray; height: number; width: number; guide: Guide } | null = null;

self.onmessage = (event: MessageEvent<MaskRequest>) => {
  const req = event.data;
  if (req.type === "image") {
    image = { imageId: req.imageId, pixels: req.pixels, height: req.height, width: req.width, guide: req.guide };
    return;
  }
  const { id, lowRes, height, width, positives, snapImageId } = req;
  let msg: MaskResponse;
  try {
    let mask;
    if (snapImageId !== undefined) {
      if (!image || image.imageId !== snapImageId || image.height !== height || image.width !== width) {
        throw new Error("the image's pixels for snapping its edges are missing");
      }
      mask = snapFull(coefficients(lowRes, SNAP_LOW_RES, image.guide), image.pixels, height, width);
    } else mask = postprocessLowRes(lowRes, height, width);
    if (positives?.length) keepClickedRegionsFull(mask, positives);
    msg = { id, rle: encodeMask(mask), error: null };
  } catch (e) {
    msg = { id, rle: null, error: e instanceof Error ? e.message : String(e) };
  }
  (self as DedicatedWorkerGlobalScope).postMessage(msg);
};
