/** Shapes shared by the API client, the session state and the view (design.md's HTTP contract). */

/** Which of SAM's outputs a candidate is: the three multimask tokens by area, or token 0. */
export type Level = "subpart" | "part" | "whole" | "single";

export interface ImageInfo {
  id: number;
  file_name: string;
  width: number;
  height: number;
  num_annotations: number;
}

export interface Category {
  id: number;
  name: string;
  /** CSS colour; the service may not store it, then the client picks one by id. */
  color?: string;
  supercategory?: string;
}

/** A prompt in image pixel coordinates (x, y), as saved with an annotation. */
export interface Prompt {
  points: [number, number][];
  /** 1 foreground, 0 background, one per point. */
  labels: number[];
  /** [x0, y0, x1, y1] or null. */
  box: [number, number, number, number] | null;
}

/** COCO run-length encoding: size is [height, width]; counts column-major. */
export interface Rle {
  size: [number, number];
  counts: string | number[];
}

export interface AnnotationBody {
  category_id: number;
  segmentation: Rle;
  score: number;
  level: Level;
  prompt: Prompt;
}

export interface Annotation extends AnnotationBody {
  id: number;
  image_id: number;
  area: number;
  bbox: [number, number, number, number];
  /** The service's optimistic-concurrency version: an update must name it. */
  version?: number;
}
