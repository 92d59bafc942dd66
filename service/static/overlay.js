// Draws a response's instances over the image on a canvas (at the image's own resolution, so the
// PNG download and pixel reads are exact): each mask blended in its colour, its box, and a label
// with class and score. Also answers which instance is under a pixel, for hovering.

import { maskIndices } from "./rle.js";

// Tableau 10: distinct hues that stay distinguishable for most colour-vision deficiencies.
export const PALETTE = [
  [78, 121, 167], [242, 142, 43], [225, 87, 89], [118, 183, 178], [89, 161, 79],
  [237, 201, 72], [176, 122, 161], [255, 157, 167], [156, 117, 95], [186, 176, 172],
];
export const MASK_ALPHA = 0.5; // share of the colour in a mask pixel
export const HIGHLIGHT_ALPHA = 0.8;
const BACKGROUND = "#808080"; // under the masks when the browser cannot show the image (e.g. TIFF)

export function colourOf(index) {
  return PALETTE[index % PALETTE.length];
}

export function hex([r, g, b]) {
  return `#${[r, g, b].map((v) => v.toString(16).padStart(2, "0")).join("")}`;
}

export class Overlay {
  constructor(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.base = null;
    this.instances = [];
    this.masks = [];
    this.owner = null;
  }

  /** The picture under the masks: the decoded image scaled to the size the server saw, or grey. */
  setImage(bitmap, width, height) {
    const { canvas, context } = this;
    canvas.width = width;
    canvas.height = height;
    context.fillStyle = BACKGROUND;
    context.fillRect(0, 0, width, height);
    if (bitmap) context.drawImage(bitmap, 0, 0, width, height);
    this.base = context.getImageData(0, 0, width, height);
  }

  /** Decodes the masks once; ``owner`` maps each pixel to the topmost (last drawn) instance. */
  setInstances(instances) {
    const { width, height } = this.canvas;
    this.instances = instances;
    this.masks = instances.map((instance) =>
      instance.segmentation && instance.segmentation.counts ? maskIndices(instance.segmentation) : new Uint32Array(0));
    this.owner = new Int32Array(width * height).fill(-1);
    this.masks.forEach((mask, i) => {
      for (const p of mask) this.owner[p] = i;
    });
  }

  /** The topmost instance whose mask covers canvas pixel (x, y), or -1. */
  instanceAt(x, y) {
    const { width, height } = this.canvas;
    if (!this.owner || x < 0 || y < 0 || x >= width || y >= height) return -1;
    return this.owner[Math.floor(y) * width + Math.floor(x)];
  }

  render(highlight = -1) {
    const { width, height } = this.canvas;
    const pixels = new ImageData(new Uint8ClampedArray(this.base.data), width, height);
    const data = pixels.data;
    this.masks.forEach((mask, i) => {
      const [r, g, b] = colourOf(i);
      const alpha = i === highlight ? HIGHLIGHT_ALPHA : MASK_ALPHA;
      for (const p of mask) {
        const o = p * 4;
        data[o] += (r - data[o]) * alpha;
        data[o + 1] += (g - data[o + 1]) * alpha;
        data[o + 2] += (b - data[o + 2]) * alpha;
      }
    });
    this.context.putImageData(pixels, 0, 0);
    // The highlighted box and label last, so nothing covers them.
    const order = this.instances.map((_, i) => i).filter((i) => i !== highlight);
    if (highlight >= 0) order.push(highlight);
    for (const i of order) this.drawBox(i, i === highlight);
  }

  drawBox(index, highlighted) {
    const { context } = this;
    const instance = this.instances[index];
    const [x, y, w, h] = instance.bbox;
    // Lines and text grow with the image, so they stay readable on large photos.
    const unit = Math.max(1, Math.round(Math.min(this.canvas.width, this.canvas.height) / 400));
    const colour = colourOf(index);
    context.strokeStyle = hex(colour);
    context.lineWidth = (highlighted ? 4 : 2) * unit;
    context.strokeRect(x, y, w, h);

    const text = `${instance.category_name} ${instance.score.toFixed(2)}`;
    const size = 12 * unit;
    context.font = `${size}px sans-serif`;
    const labelWidth = context.measureText(text).width + 6 * unit;
    const labelHeight = size + 4 * unit;
    const top = y >= labelHeight ? y - labelHeight : y; // above the box, or inside at the image's top
    context.fillStyle = hex(colour);
    context.fillRect(x, top, labelWidth, labelHeight);
    const [r, g, b] = colour;
    context.fillStyle = 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff";
    context.textBaseline = "middle";
    context.fillText(text, x + 3 * unit, top + labelHeight / 2);
  }
}
