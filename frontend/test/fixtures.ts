/** Loads fixtures/reference.json (written by make_fixtures.py from torch and pycocotools). */
import { readFileSync } from "node:fs";

export const reference = JSON.parse(readFileSync(new URL("./fixtures/reference.json", import.meta.url), "utf8"));

export function f32(b64: string): Float32Array {
  const bytes = Buffer.from(b64, "base64");
  return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

/** Unpacks np.packbits of a row-major h x w mask into a column-major 0/1 array (COCO's order). */
export function columnMajorBits(b64: string, h: number, w: number): Uint8Array {
  const bytes = Buffer.from(b64, "base64");
  const out = new Uint8Array(h * w);
  for (let i = 0; i < h * w; i++) {
    const bit = (bytes[i >> 3] >> (7 - (i & 7))) & 1;
    const y = Math.floor(i / w);
    const x = i % w;
    out[x * h + y] = bit;
  }
  return out;
}
