/** IEEE 754 half -> float32 conversion for the embedding the service sends as float16. */

let table: Float32Array | null = null;

function halfTable(): Float32Array {
  if (table) return table;
  table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    let v: number;
    if (exp === 0) v = frac * 2 ** -24;
    else if (exp === 31) v = frac ? NaN : Infinity;
    else v = (1 + frac / 1024) * 2 ** (exp - 15);
    table[h] = sign * v;
  }
  return table;
}

/** Little-endian float16 bytes -> Float32Array (exact: every half is a float32). */
export function float16ToFloat32(bytes: ArrayBuffer): Float32Array {
  const halves = new Uint16Array(bytes);
  const t = halfTable();
  const out = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) out[i] = t[halves[i]];
  return out;
}
