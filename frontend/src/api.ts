/** The service's HTTP API (design.md), with its `{"error": "..."}` bodies turned into ApiError. */
import type { Annotation, AnnotationBody, Category, ImageInfo } from "./types";

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

export interface EmbeddingPayload {
  /** Raw float16 little-endian bytes of [1, 256, 64, 64]. */
  fp16: ArrayBuffer;
  modelId: string | null;
}

export const EMBEDDING_BYTES = 256 * 64 * 64 * 2;

async function check(response: Response, what: string): Promise<Response> {
  if (response.ok) return response;
  let message = `${what} failed (HTTP ${response.status})`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch {
    // not JSON: keep the generic message
  }
  throw new ApiError(message, response.status);
}

async function request(method: string, url: string, what: string, body?: unknown): Promise<Response> {
  let response: Response;
  try {
    response = await fetch(url, {
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(`The trimask server cannot be reached (${what}). Is \`trimask serve\` running?`, 0);
  }
  return check(response, what);
}

const json = async <T>(method: string, url: string, what: string, body?: unknown): Promise<T> =>
  (await request(method, url, what, body)).json() as Promise<T>;

export const api = {
  status: () => json<Record<string, unknown>>("GET", "/api/status", "Reading the server status"),
  images: () => json<ImageInfo[]>("GET", "/api/images", "Listing the images"),
  imageUrl: (id: number) => `/api/images/${id}/file`,
  /** part: "decoder" (complete), or the optional fast path's "prepare" / "prepared". */
  decoderUrl: (quantized: boolean, part: "decoder" | "prepare" | "prepared" | "hover" = "decoder") => {
    const q = new URLSearchParams();
    if (quantized) q.set("quantized", "1");
    if (part !== "decoder") q.set("part", part);
    const query = q.toString();
    return query ? `/api/decoder.onnx?${query}` : "/api/decoder.onnx";
  },

  async embedding(id: number): Promise<EmbeddingPayload> {
    const response = await request("GET", `/api/images/${id}/embedding`, "Computing the image embedding");
    const dtype = response.headers.get("X-Embedding-Dtype");
    if (dtype && dtype !== "float16") throw new ApiError(`The server sent a ${dtype} embedding; this page reads float16.`, 0);
    const fp16 = await response.arrayBuffer();
    if (fp16.byteLength !== EMBEDDING_BYTES) {
      throw new ApiError(`The server sent an embedding of ${fp16.byteLength} bytes, expected ${EMBEDDING_BYTES}.`, 0);
    }
    return { fp16, modelId: response.headers.get("X-Model-Id") };
  },

  annotations: (imageId: number) => json<Annotation[]>("GET", `/api/images/${imageId}/annotations`, "Loading the objects"),
  createAnnotation: (imageId: number, body: AnnotationBody) =>
    json<Annotation>("POST", `/api/images/${imageId}/annotations`, "Saving the object", body),
  /** `version` is the one the change is based on (the service answers 409 if it is outdated). */
  updateAnnotation: (id: number, version: number | undefined, patch: Partial<AnnotationBody>) =>
    json<Annotation>("PUT", `/api/annotations/${id}`, "Changing the object", version === undefined ? patch : { ...patch, version }),
  deleteAnnotation: async (id: number): Promise<void> => {
    await request("DELETE", `/api/annotations/${id}`, "Deleting the object");
  },
  categories: () => json<Category[]>("GET", "/api/categories", "Loading the categories"),
  createCategory: (name: string, color: string) =>
    json<Category>("POST", "/api/categories", "Creating the category", { name, color }),
};
