/// <reference lib="webworker" />
/**
 * Turns an accepted candidate's low-res logits into its full-resolution COCO RLE off the
 * main thread (a 12-megapixel photo takes a few hundred ms, which would freeze the page).
 */
import { encodeMask } from "./coco_rle";
import { postprocessLowRes } from "./mask_postprocess";
import { keepClickedRegionsFull } from "./mask_regions";
import type { MaskRequest, MaskResponse } from "./mask_encoder";

self.onmessage = (event: MessageEvent<MaskRequest>) => {
  const { id, lowRes, height, width, positives } = event.data;
  let msg: MaskResponse;
  try {
    const mask = postprocessLowRes(lowRes, height, width);
    if (positives?.length) keepClickedRegionsFull(mask, positives);
    msg = { id, rle: encodeMask(mask), error: null };
  } catch (e) {
    msg = { id, rle: null, error: e instanceof Error ? e.message : String(e) };
  }
  (self as DedicatedWorkerGlobalScope).postMessage(msg);
};
