/**
 * The view: draws a SessionState into the page and reports clicks on its own
 * controls through callbacks. It keeps only caches (canvases built from
 * masks), never annotation state.
 */
import { decodeRle } from "./coco_rle";
import { fitStage, type Box2D, type ViewTransform } from "./coordinates";
import { displayMaskCanvas, hexToRgb, paintMasks, sampleMask, type Rgb } from "./mask_canvas";
import type { SessionState } from "./session";
import type { Category, ImageInfo } from "./types";
import type { Preview } from "./worker_protocol";

const CANDIDATE_RGB: Rgb = [77, 163, 255];
const THUMB_WIDTH = 160;
const OBJECT_LAYER_LONG_SIDE = 1024;
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const COLORS_KEY = "trimask.categoryColors";
const SVG = "http://www.w3.org/2000/svg";

function $(id: string): HTMLElement {
  return document.getElementById(id)!;
}

export interface DrawExtras {
  /** The hover preview's one mask. */
  hover: Preview | null;
  view: ViewTransform;
  ready: boolean;
}

export class View {
  readonly stage = $("stage") as HTMLDivElement;
  private world = $("world") as HTMLDivElement;
  private img = $("image") as HTMLImageElement;
  private objectsLayer = $("objects-layer") as HTMLCanvasElement;
  private maskLayer = $("mask-layer") as HTMLCanvasElement;
  private promptLayer = $("prompt-layer") as unknown as SVGSVGElement;
  private candidatesBox = $("candidates");
  private objectList = $("objects") as HTMLUListElement;
  private categorySelect = $("category-select") as HTMLSelectElement;
  private categoryName = $("category-name") as HTMLInputElement;
  private categoryColor = $("category-color") as HTMLInputElement;

  onCandidate: (index: number) => void = () => {};
  onPrev: () => void = () => {};
  onNext: () => void = () => {};
  onCategory: (id: number) => void = () => {};
  onAddCategory: (name: string, color: string) => void = () => {};
  onSelectObject: (id: number) => void = () => {};
  onToggleHidden: (id: number) => void = () => {};
  onDeleteObject: (id: number) => void = () => {};
  onRelabelObject: (id: number, categoryId: number) => void = () => {};

  private colors: Record<string, string> = JSON.parse(localStorage.getItem(COLORS_KEY) ?? "{}");
  private imageLoad: Promise<void> = Promise.resolve();
  private thumbSource: HTMLCanvasElement | null = null;
  private candidateKey: unknown = null;
  private candidateCanvases: HTMLCanvasElement[] = [];
  private hoverKey: unknown = null;
  private hoverCanvas: HTMLCanvasElement | null = null;
  private objectMasks = new Map<number, Uint8Array>();
  private objectsKey = "";
  private objectListKey = "";
  private categoriesKey = "";

  constructor() {
    $("prev").addEventListener("click", () => this.onPrev());
    $("next").addEventListener("click", () => this.onNext());
    this.categorySelect.addEventListener("change", () => this.onCategory(Number(this.categorySelect.value)));
    const add = () => {
      const name = this.categoryName.value.trim();
      if (!name) return;
      this.categoryName.value = "";
      this.onAddCategory(name, this.categoryColor.value);
    };
    $("category-add").addEventListener("click", add);
    this.categoryName.addEventListener("keydown", (e) => {
      if (e.key === "Enter") add();
      e.stopPropagation();
    });
    this.img.addEventListener("load", () => (this.thumbSource = null));
  }

  // ------------------------------------------------------------ page chrome

  showError(message: string): void {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  clearError(): void {
    $("error").hidden = true;
  }

  setStatus(text: string): void {
    $("status").textContent = text;
  }

  setLoading(text: string): void {
    $("loading").textContent = text;
  }

  setNavigation(index: number, count: number, name: string, done: number): void {
    $("image-pos").textContent = count ? `${index + 1} / ${count}` : "";
    $("image-name").textContent = name;
    $("done-count").textContent = count ? `${done} of ${count} with objects` : "";
  }

  setPanning(on: boolean): void {
    this.stage.classList.toggle("panning", on);
  }

  categoryColorInput(): string {
    return this.categoryColor.value;
  }

  rememberColor(id: number, color: string): void {
    this.colors[String(id)] = color;
    localStorage.setItem(COLORS_KEY, JSON.stringify(this.colors));
  }

  colorOf(c: Category | undefined): string {
    if (!c) return "#888888";
    return c.color ?? this.colors[String(c.id)] ?? PALETTE[c.id % PALETTE.length];
  }

  // ------------------------------------------------------------ image and stage

  setImage(image: ImageInfo): void {
    this.stage.dataset.ready = "false";
    this.stage.dataset.imageId = String(image.id);
    this.objectMasks.clear();
    this.objectsKey = "";
    this.candidateKey = null;
    this.imageLoad = new Promise((resolve, reject) => {
      this.img.onload = () => resolve();
      this.img.onerror = () => reject(new Error(`The image ${image.file_name} could not be loaded.`));
    });
    this.img.src = `/api/images/${image.id}/file`;
    this.promptLayer.setAttribute("viewBox", `0 0 ${image.width} ${image.height}`);
    this.layout(image);
  }

  imageLoaded(): Promise<void> {
    return this.imageLoad;
  }

  /** The loaded image's RGBA pixels at its natural size, or null when it is not `height` x `width` (e.g. an
   * orientation the server and the browser read differently) or cannot be read. */
  imagePixels(height: number, width: number): Uint8ClampedArray | null {
    if (this.img.naturalWidth !== width || this.img.naturalHeight !== height) return null;
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    const ctx = c.getContext("2d", { willReadFrequently: true });
    if (!ctx) return null;
    ctx.drawImage(this.img, 0, 0);
    return ctx.getImageData(0, 0, width, height).data;
  }

  /** Sizes the stage to the largest box with the image's aspect ratio that fits the viewport. */
  layout(image: ImageInfo): void {
    const viewport = $("viewport");
    const style = getComputedStyle(viewport);
    const availW = viewport.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const availH = viewport.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    const [w, h] = fitStage(image.width, image.height, Math.max(50, availW), Math.max(50, availH));
    this.stage.style.width = `${w}px`;
    this.stage.style.height = `${h}px`;
  }

  stageBox(): Box2D {
    const r = this.stage.getBoundingClientRect();
    return { left: r.left, top: r.top, width: r.width, height: r.height };
  }

  // ------------------------------------------------------------ drawing

  draw(state: SessionState, extras: DrawExtras): void {
    this.stage.dataset.ready = extras.ready ? "true" : "false";
    const v = extras.view;
    this.world.style.transform = `translate(${v.panX}px, ${v.panY}px) scale(${v.zoom})`;
    this.drawCategories(state);
    this.drawCandidates(state);
    this.drawMaskLayer(state, extras.hover);
    this.drawPrompt(state, v, null);
    this.drawObjects(state);
  }

  private drawCategories(state: SessionState): void {
    const key = JSON.stringify([state.categories.map((c) => [c.id, c.name, this.colorOf(c)]), state.currentCategory]);
    if (key === this.categoriesKey) return;
    this.categoriesKey = key;
    if (state.categories.length === 0) {
      const o = document.createElement("option");
      o.textContent = "object (created on the first save)";
      this.categorySelect.replaceChildren(o);
      this.objectListKey = "";
      return;
    }
    this.categorySelect.replaceChildren(
      ...state.categories.map((c) => {
        const o = document.createElement("option");
        o.value = String(c.id);
        o.textContent = c.name;
        o.style.color = this.colorOf(c);
        return o;
      }),
    );
    if (state.currentCategory !== null) this.categorySelect.value = String(state.currentCategory);
    this.objectListKey = ""; // relabel menus list the categories too
  }

  private thumbnailSource(): HTMLCanvasElement | null {
    if (this.thumbSource) return this.thumbSource;
    if (!this.img.complete || !this.img.naturalWidth) return null;
    const c = document.createElement("canvas");
    c.width = THUMB_WIDTH;
    c.height = Math.max(1, Math.round((THUMB_WIDTH * this.img.naturalHeight) / this.img.naturalWidth));
    c.getContext("2d")!.drawImage(this.img, 0, 0, c.width, c.height);
    this.thumbSource = c;
    return c;
  }

  private drawCandidates(state: SessionState): void {
    const pending = state.prompt.points.length > 0 || state.prompt.box !== null;
    const key = state.result ?? (pending ? "pending" : "idle");
    if (key !== this.candidateKey) {
      this.candidateKey = key;
      this.candidateCanvases = [];
      const result = state.result;
      const thumb = this.thumbnailSource();
      const buttons = state.candidates.map((c, i) => {
        const mask = result ? displayMaskCanvas(result.display, c.token, result.displayH, result.displayW, CANDIDATE_RGB, 170) : null;
        if (mask) this.candidateCanvases.push(mask);
        const button = document.createElement("button");
        button.className = "candidate";
        button.setAttribute("role", "option");
        button.dataset.testid = "candidate";
        button.dataset.level = c.level;
        button.dataset.iou = c.iou.toFixed(4);
        button.title = `${c.level}: predicted IoU ${c.iou.toFixed(3)} (key ${i + 1})`;
        const canvas = document.createElement("canvas");
        canvas.width = THUMB_WIDTH;
        canvas.height = thumb ? thumb.height : THUMB_WIDTH;
        const ctx = canvas.getContext("2d")!;
        if (thumb) ctx.drawImage(thumb, 0, 0);
        if (mask) ctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
        const label = document.createElement("span");
        label.className = "label";
        const name = document.createElement("span");
        name.textContent = state.candidates.length > 1 ? `${i + 1} ${c.level}` : c.level;
        const iou = document.createElement("span");
        iou.textContent = c.iou.toFixed(2);
        iou.title = "predicted IoU";
        label.append(name, iou);
        button.append(canvas, label);
        button.addEventListener("mousedown", (e) => e.preventDefault()); // keep focus off: Enter saves
        button.addEventListener("click", () => this.onCandidate(i));
        return button;
      });
      if (buttons.length) this.candidatesBox.replaceChildren(...buttons);
      else {
        const hint = document.createElement("p");
        hint.className = "hint";
        hint.textContent = pending ? "Decoding…" : "Click an object to see its subpart, part and whole.";
        this.candidatesBox.replaceChildren(hint);
      }
    }
    this.candidatesBox.querySelectorAll<HTMLElement>("[data-testid=candidate]").forEach((b, i) => {
      b.setAttribute("aria-selected", i === state.chosen ? "true" : "false");
    });
  }

  private drawMaskLayer(state: SessionState, hover: DrawExtras["hover"]): void {
    const canvas = this.maskLayer;
    const ctx = canvas.getContext("2d")!;
    const chosen = this.candidateCanvases[state.chosen];
    let source: HTMLCanvasElement | null = chosen ?? null;
    if (!source && hover) {
      if (hover !== this.hoverKey) {
        this.hoverKey = hover;
        this.hoverCanvas = displayMaskCanvas(hover.display, 0, hover.displayH, hover.displayW, CANDIDATE_RGB, 90);
      }
      source = this.hoverCanvas;
    }
    if (!source) {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      return;
    }
    if (canvas.width !== source.width || canvas.height !== source.height) {
      canvas.width = source.width;
      canvas.height = source.height;
    } else ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(source, 0, 0);
  }

  /** Points as dots and the box as a rectangle, sized to stay constant on screen at any zoom. */
  drawPrompt(state: SessionState, view: ViewTransform, dragBox: [number, number, number, number] | null): void {
    const image = state.image;
    if (!image) return;
    const box = this.stageBox();
    const unit = box.width > 0 ? image.width / box.width / view.zoom : 1; // image px per screen px
    const nodes: SVGElement[] = [];
    const rect = (b: [number, number, number, number], dashed: boolean) => {
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", String(Math.min(b[0], b[2])));
      r.setAttribute("y", String(Math.min(b[1], b[3])));
      r.setAttribute("width", String(Math.abs(b[2] - b[0])));
      r.setAttribute("height", String(Math.abs(b[3] - b[1])));
      r.setAttribute("fill", "none");
      r.setAttribute("stroke", "#ffd24d");
      r.setAttribute("stroke-width", String(2 * unit));
      if (dashed) r.setAttribute("stroke-dasharray", `${6 * unit} ${4 * unit}`);
      nodes.push(r);
    };
    if (state.prompt.box) rect(state.prompt.box, false);
    if (dragBox) rect(dragBox, true);
    state.prompt.points.forEach(([x, y], i) => {
      const c = document.createElementNS(SVG, "circle");
      c.setAttribute("cx", String(x));
      c.setAttribute("cy", String(y));
      c.setAttribute("r", String(6 * unit));
      c.setAttribute("fill", state.prompt.labels[i] === 1 ? "#22cc55" : "#ee3333");
      c.setAttribute("stroke", "#000");
      c.setAttribute("stroke-width", String(2 * unit));
      nodes.push(c);
    });
    this.promptLayer.replaceChildren(...nodes);
  }

  drawDragBox(box: [number, number, number, number], state: SessionState, view: ViewTransform): void {
    this.drawPrompt(state, view, box);
  }

  private objectMask(id: number, state: SessionState, h: number, w: number): Uint8Array {
    let m = this.objectMasks.get(id);
    if (!m) {
      const o = state.objects.find((a) => a.id === id)!;
      m = sampleMask(decodeRle(o.segmentation), h, w);
      this.objectMasks.set(id, m);
    }
    return m;
  }

  private drawObjects(state: SessionState): void {
    const image = state.image;
    if (!image) return;
    const colorById = new Map(state.categories.map((c) => [c.id, this.colorOf(c)]));
    const key = JSON.stringify([image.id, state.objects.map((o) => [o.id, o.category_id]), state.hidden, state.selectedObject, [...colorById]]);
    if (key !== this.objectsKey) {
      this.objectsKey = key;
      const scale = Math.min(1, OBJECT_LAYER_LONG_SIDE / Math.max(image.width, image.height));
      const w = Math.max(1, Math.round(image.width * scale));
      const h = Math.max(1, Math.round(image.height * scale));
      const canvas = this.objectsLayer;
      canvas.width = w;
      canvas.height = h;
      const ctx = canvas.getContext("2d")!;
      const img = ctx.createImageData(w, h);
      const visible = state.objects.filter((o) => !state.hidden.includes(o.id));
      paintMasks(
        img,
        visible.map((o) => ({
          data: this.objectMask(o.id, state, h, w),
          rgb: hexToRgb(colorById.get(o.category_id) ?? "#888888"),
          alpha: o.id === state.selectedObject ? 200 : 110,
        })),
      );
      ctx.putImageData(img, 0, 0);
    }
    this.drawObjectList(state, colorById);
  }

  private drawObjectList(state: SessionState, colorById: Map<number, string>): void {
    const key = JSON.stringify([state.objects.map((o) => [o.id, o.category_id, o.level]), state.hidden, state.selectedObject, this.categoriesKey]);
    if (key === this.objectListKey) return;
    this.objectListKey = key;
    $("object-count").textContent = state.objects.length ? String(state.objects.length) : "";
    this.objectList.replaceChildren(
      ...state.objects.map((o) => {
        const li = document.createElement("li");
        li.dataset.testid = "object";
        li.dataset.objectId = String(o.id);
        li.dataset.categoryId = String(o.category_id);
        li.classList.toggle("selected", o.id === state.selectedObject);
        li.classList.toggle("hidden-object", state.hidden.includes(o.id));
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = colorById.get(o.category_id) ?? "#888";
        swatch.addEventListener("click", () => this.onSelectObject(o.id));
        const select = document.createElement("select");
        select.dataset.testid = "object-category";
        select.title = "Category of this object";
        for (const c of state.categories) {
          const opt = document.createElement("option");
          opt.value = String(c.id);
          opt.textContent = c.name;
          select.append(opt);
        }
        select.value = String(o.category_id);
        select.addEventListener("change", () => this.onRelabelObject(o.id, Number(select.value)));
        const level = document.createElement("span");
        level.className = "level";
        level.textContent = o.level;
        const hide = document.createElement("button");
        hide.dataset.testid = "object-hide";
        hide.textContent = state.hidden.includes(o.id) ? "show" : "hide";
        hide.addEventListener("click", () => this.onToggleHidden(o.id));
        const del = document.createElement("button");
        del.dataset.testid = "object-delete";
        del.textContent = "✕";
        del.title = "Delete this object (Ctrl+Z brings it back)";
        del.addEventListener("click", () => this.onDeleteObject(o.id));
        level.addEventListener("click", () => this.onSelectObject(o.id));
        li.append(swatch, select, level, hide, del);
        return li;
      }),
    );
  }
}
