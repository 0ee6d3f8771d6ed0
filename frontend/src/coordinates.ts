/**
 * Coordinate frames: client (CSS px of the page), stage-local, image pixels,
 * and SAM's 1024 frame (image resized so its longest side is 1024).
 *
 * The stage box has the image's aspect ratio; zoom and pan are applied to an
 * inner layer as `translate(panX, panY) scale(zoom)` with origin top-left, so
 * at zoom 1 and no pan image x = (clientX - left) * imageWidth / stageWidth.
 */

export const SAM_LONG_SIDE = 1024;

/** Zoom and pan of the inner layer, in stage CSS pixels. */
export interface ViewTransform {
  zoom: number;
  panX: number;
  panY: number;
}

export interface Box2D {
  left: number;
  top: number;
  width: number;
  height: number;
}

export const IDENTITY_VIEW: ViewTransform = { zoom: 1, panX: 0, panY: 0 };
export const MIN_ZOOM = 1;
export const MAX_ZOOM = 32;

/** SAM's ResizeLongestSide target shape: (newH, newW), rounded half up like the official code. */
export function getPreprocessShape(h: number, w: number, longSide = SAM_LONG_SIDE): [number, number] {
  const scale = longSide / Math.max(h, w);
  return [Math.floor(h * scale + 0.5), Math.floor(w * scale + 0.5)];
}

/** Client coordinates -> image pixel coordinates (continuous, not rounded). */
export function clientToImage(
  clientX: number,
  clientY: number,
  stage: Box2D,
  view: ViewTransform,
  imageW: number,
  imageH: number,
): [number, number] {
  const localX = (clientX - stage.left - view.panX) / view.zoom;
  const localY = (clientY - stage.top - view.panY) / view.zoom;
  return [(localX * imageW) / stage.width, (localY * imageH) / stage.height];
}

/** Image pixel coordinates -> client coordinates (inverse of clientToImage). */
export function imageToClient(
  x: number,
  y: number,
  stage: Box2D,
  view: ViewTransform,
  imageW: number,
  imageH: number,
): [number, number] {
  return [
    stage.left + view.panX + ((x * stage.width) / imageW) * view.zoom,
    stage.top + view.panY + ((y * stage.height) / imageH) * view.zoom,
  ];
}

/** Image pixel coordinates -> SAM's 1024 frame (the official apply_coords: scale each axis). */
export function imageToFrame(x: number, y: number, imageH: number, imageW: number): [number, number] {
  const [newH, newW] = getPreprocessShape(imageH, imageW);
  return [x * (newW / imageW), y * (newH / imageH)];
}

/** Keeps the stage-local point (ax, ay) fixed while multiplying the zoom by `factor`. */
export function zoomAt(view: ViewTransform, ax: number, ay: number, factor: number, stage: Box2D): ViewTransform {
  const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, view.zoom * factor));
  const k = zoom / view.zoom;
  return clampView({ zoom, panX: ax - (ax - view.panX) * k, panY: ay - (ay - view.panY) * k }, stage);
}

export function panBy(view: ViewTransform, dx: number, dy: number, stage: Box2D): ViewTransform {
  return clampView({ ...view, panX: view.panX + dx, panY: view.panY + dy }, stage);
}

/** Keeps the zoomed image covering the stage (no empty margins when zoomed in). */
export function clampView(view: ViewTransform, stage: Box2D): ViewTransform {
  const minX = stage.width - stage.width * view.zoom;
  const minY = stage.height - stage.height * view.zoom;
  return {
    zoom: view.zoom,
    panX: Math.min(0, Math.max(minX, view.panX)),
    panY: Math.min(0, Math.max(minY, view.panY)),
  };
}

/** The largest box with the image's aspect ratio that fits in (availW, availH). */
export function fitStage(imageW: number, imageH: number, availW: number, availH: number): [number, number] {
  const scale = Math.min(availW / imageW, availH / imageH);
  return [Math.max(1, Math.floor(imageW * scale)), Math.max(1, Math.floor(imageH * scale))];
}
