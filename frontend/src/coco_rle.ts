/**
 * COCO run-length encoding as pycocotools does it: runs over the column-major
 * mask starting with a run of zeros, then the compressed string form
 * (rleToString: 5-bit groups, continuation bit 0x20, sign bit 0x10 on the last
 * group, +48 offset, and counts from the third on stored as the difference to
 * the count two places back).
 */
import type { ColumnMajorMask } from "./mask_postprocess";
import type { Rle } from "./types";

/** Run lengths of a column-major binary mask, first run counting zeros. */
export function maskToCounts(data: Uint8Array): number[] {
  const counts: number[] = [];
  let current = 0;
  let run = 0;
  for (let i = 0; i < data.length; i++) {
    const v = data[i] ? 1 : 0;
    if (v !== current) {
      counts.push(run);
      run = 0;
      current = v;
    }
    run++;
  }
  counts.push(run);
  return counts;
}

/** pycocotools' rleToString. Arithmetic on Numbers (not 32-bit ints) keeps large counts exact. */
export function countsToString(counts: number[]): string {
  let s = "";
  for (let i = 0; i < counts.length; i++) {
    let x = counts[i];
    if (i > 2) x -= counts[i - 2];
    let more = true;
    while (more) {
      let c = x & 0x1f;
      x = Math.floor(x / 32);
      more = c & 0x10 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      s += String.fromCharCode(c + 48);
    }
  }
  return s;
}

/** pycocotools' rleFrString. */
export function stringToCounts(s: string): number[] {
  const counts: number[] = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && c & 0x10) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

export function encodeMask(mask: ColumnMajorMask): Rle {
  return { size: [mask.height, mask.width], counts: countsToString(maskToCounts(mask.data)) };
}

/** Decodes an RLE (string or list counts) into a column-major 0/1 mask. */
export function decodeRle(rle: Rle): ColumnMajorMask {
  const [height, width] = rle.size;
  const counts = typeof rle.counts === "string" ? stringToCounts(rle.counts) : rle.counts;
  const data = new Uint8Array(height * width);
  let pos = 0;
  let value = 0;
  for (const n of counts) {
    if (value) data.fill(1, pos, pos + n);
    pos += n;
    value ^= 1;
  }
  return { height, width, data };
}

/** Number of foreground pixels (what pycocotools' area gives). */
export function rleArea(rle: Rle): number {
  const counts = typeof rle.counts === "string" ? stringToCounts(rle.counts) : rle.counts;
  let area = 0;
  for (let i = 1; i < counts.length; i += 2) area += counts[i];
  return area;
}
