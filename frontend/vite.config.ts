import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

// onnxruntime-web's default entry points inline their WASM loader; we use the
// "extern wasm" builds instead so the .wasm/.mjs files come from our own server
// at /ort/ (never a CDN, and no 14-28 MB files copied into the bundle).
const ortDist = fileURLToPath(new URL("./node_modules/onnxruntime-web/dist/", import.meta.url));

export default defineConfig({
  base: "/",
  resolve: {
    alias: [
      { find: /^onnxruntime-web\/wasm$/, replacement: ortDist + "ort.wasm.min.mjs" },
      { find: /^onnxruntime-web\/webgpu$/, replacement: ortDist + "ort.webgpu.min.mjs" },
    ],
  },
  worker: { format: "es" },
  build: { target: "es2022", outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 1000 },
  test: { include: ["test/**/*.test.ts"], environment: "node" },
});
