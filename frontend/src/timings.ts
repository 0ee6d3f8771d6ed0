/**
 * Debug hook for the benchmark and for curious users: window.__trimaskTimings
 * collects milliseconds per interaction (click: input event -> three candidates
 * drawn; hover: pointer move -> preview drawn; open: image chosen -> ready;
 * decode: time inside the worker's session.run; busy: workers decoding (background probes
 * included) or preparing an image now, so a benchmark can wait for the page to be idle).
 */
export interface Timings {
  click: number[];
  hover: number[];
  open: number[];
  decode: number[];
  busy: number;
}

declare global {
  interface Window {
    __trimaskTimings: Timings;
  }
}

export function installTimings(): Timings {
  const timings: Timings = { click: [], hover: [], open: [], decode: [], busy: 0 };
  window.__trimaskTimings = timings;
  return timings;
}
