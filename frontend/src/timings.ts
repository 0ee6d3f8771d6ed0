/**
 * Debug hook for the benchmark and for curious users: window.__trimaskTimings
 * collects milliseconds per interaction (click: input event -> three candidates
 * drawn; hover: pointer move -> preview drawn; open: image chosen -> ready;
 * decode: time inside the worker's session.run).
 */
export interface Timings {
  click: number[];
  hover: number[];
  open: number[];
  decode: number[];
}

declare global {
  interface Window {
    __trimaskTimings: Timings;
  }
}

export function installTimings(): Timings {
  const timings: Timings = { click: [], hover: [], open: [], decode: [] };
  window.__trimaskTimings = timings;
  return timings;
}
