// A CNN job's images on the job page: the picker of an input (one of the job's validation
// images, GET /jobs/{id}/samples, or an uploaded PNG or .npy), the canvases that draw images
// one canvas pixel per value, and the first conv layer's filters (GET /jobs/{id}/filters).

import { api } from "./api.js";
import { errorText, h } from "./ui.js";

const GALLERY = 16; // validation images offered
const MAX_FILE_BYTES = 1024 * 1024; // an uploaded PNG or .npy; a 28×28 image is a few KB
const SHOWN_CHANNELS = 4; // of each filter

// Whether the job's model takes images: a sequential model whose input_shape is [C, H, W].
export const takesImages = (spec) =>
  spec.model?.type === "sequential" && spec.model.input_shape?.length === 3;

export const shapeText = (shape) => shape.join("×");

// -- drawing ------------------------------------------------------------------------------

// An H×W grid (nested lists) as the canvas's pixels; `colour(v)` gives [r, g, b].
export function drawGrid(canvas, grid, colour) {
  const height = grid.length;
  const width = grid[0].length;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(width, height);
  grid.flat().forEach((v, i) => {
    pixels.data.set([...colour(v), 255], 4 * i);
  });
  ctx.putImageData(pixels, 0, 0);
  return canvas;
}

const extent = (values) => [Math.min(...values), Math.max(...values)];

// The channels' mean of a C×H×W image: what is drawn in grey.
export function grey(image) {
  const [first, ...rest] = image;
  return first.map((row, y) =>
    row.map((v, x) => (v + rest.reduce((s, c) => s + c[y][x], 0)) / image.length),
  );
}

// Low values white, high ones black (ink, as the image datasets' pixels and the heatmap's
// picture), over the image's own range.
function greyScale(grid) {
  const [lo, hi] = extent(grid.flat());
  return (v) => {
    const g = 255 - Math.round((255 * (v - lo)) / (hi - lo || 1));
    return [g, g, g];
  };
}

// Blue for positive, white for zero, red for negative (as the attributions), up to ±max.
export function diverging(max) {
  return (v) => {
    const t = Math.min(Math.abs(v) / (max || 1), 1);
    const fade = Math.round(255 * (1 - t));
    return v < 0 ? [255, fade, fade] : [fade, fade, 255];
  };
}

export function imageCanvas(image, attrs = {}) {
  const g = grey(image);
  return drawGrid(h("canvas.pixels", attrs), g, greyScale(g));
}

// -- reading an uploaded image --------------------------------------------------------------

// Nested C×H×W lists from flat values in C, H, W order.
function nest(values, [c, hh, w]) {
  return Array.from({ length: c }, (_, k) =>
    Array.from({ length: hh }, (_, y) => {
      const start = (k * hh + y) * w;
      return Array.from(values.slice(start, start + w));
    }),
  );
}

// A PNG (or any image the browser decodes) resized to H×W; values 0..1 as the builtin image
// datasets have them: grey for one channel, red, green, blue for three.
async function fromPicture(file, [c, hh, w]) {
  if (c !== 1 && c !== 3) throw new Error(`a picture has 1 or 3 channels; the model takes ${c}`);
  const bitmap = await createImageBitmap(file, { resizeWidth: w, resizeHeight: hh });
  const canvas = h("canvas", { width: w, height: hh });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, w, hh).data;
  const values = [];
  for (let k = 0; k < c; k += 1) {
    for (let i = 0; i < w * hh; i += 1) {
      const [r, g, b] = rgba.subarray(4 * i, 4 * i + 3);
      values.push(c === 1 ? (0.299 * r + 0.587 * g + 0.114 * b) / 255 : rgba[4 * i + k] / 255);
    }
  }
  return nest(values, [c, hh, w]);
}

const NPY_TYPES = {
  f4: ["getFloat32", 4],
  f8: ["getFloat64", 8],
  u1: ["getUint8", 1],
  i4: ["getInt32", 4],
};

// A .npy file (NumPy's format, version 1 to 3) of C×H×W values, or 1×C×H×W, or H×W when C is
// 1; float32, float64, uint8 or int32, C order. Its values are taken as they are.
export function fromNpy(buffer, shape) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.subarray(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([<>|=])(\w\d)'/.exec(header);
  const dims = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !dims || /'fortran_order':\s*True/.test(header)) {
    throw new Error("the .npy must hold a C-order array");
  }
  const type = NPY_TYPES[descr[2]];
  if (!type) throw new Error(`the .npy holds ${descr[2]}; use float32, float64, uint8 or int32`);
  const given = dims[1].split(",").filter((d) => d.trim()).map(Number);
  const size = shape.reduce((a, b) => a * b, 1);
  const fits = [shape, [1, ...shape], shape[0] === 1 ? shape.slice(1) : null, [size]];
  if (!fits.some((s) => s && s.join() === given.join())) {
    const holds = `the .npy holds a ${shapeText(given)} array`;
    throw new Error(`${holds}; the model takes ${shapeText(shape)}`);
  }
  const [read, itemsize] = type;
  const little = descr[1] !== ">";
  const data = start + headerLength;
  const values = Array.from({ length: size }, (_, i) => view[read](data + i * itemsize, little));
  if (!values.every(Number.isFinite)) throw new Error("the .npy holds a value that is not finite");
  return nest(values, shape);
}

async function readImage(file, shape) {
  if (file.size > MAX_FILE_BYTES) {
    throw new Error(`${file.name} is larger than ${MAX_FILE_BYTES / 1024} KB`);
  }
  if (file.name.toLowerCase().endsWith(".npy")) return fromNpy(await file.arrayBuffer(), shape);
  return fromPicture(file, shape);
}

// -- the picker -----------------------------------------------------------------------------

// The job's validation images to click, an upload, and the image picked (the first validation
// image to begin with). `onPick(picked)` hears every change; `picked()` is the current one:
// {image (C×H×W lists), label (the validation label, or null), text}.
export function imagePicker(jobId, spec) {
  const shape = spec.model.input_shape;
  const listeners = [];
  let current = null;
  const gallery = h("div.image-gallery", { id: "image-gallery", role: "list" });
  const preview = h("div.image-preview", { id: "image-picked" });
  const error = h("p.form-error", { id: "image-error", hidden: true });
  const file = h("input", { id: "image-file", type: "file", accept: ".png,.npy,image/png" });

  function pick(picked) {
    current = picked;
    error.hidden = true;
    const canvas = imageCanvas(picked.image, { id: "image-picked-canvas" });
    const text = h("span.small.muted", { id: "image-picked-text" }, picked.text);
    preview.replaceChildren(canvas, text);
    for (const el of gallery.children) {
      el.classList.toggle("selected", el.dataset.index === String(picked.index));
    }
    for (const listen of listeners) listen(picked);
  }

  file.addEventListener("change", async () => {
    const chosen = file.files[0];
    if (!chosen) return;
    try {
      const image = await readImage(chosen, shape);
      pick({ image, label: null, index: null, text: `uploaded ${chosen.name}` });
    } catch (err) {
      error.textContent = errorText(err);
      error.hidden = false;
    } finally {
      file.value = ""; // the same file again is a new choice
    }
  });

  async function load() {
    let page;
    try {
      page = await api(`/jobs/${jobId}/samples?limit=${GALLERY}`);
    } catch (err) {
      gallery.replaceChildren(h("p.small.muted", {}, errorText(err)));
      return;
    }
    const thumbs = page.samples.map((s) => {
      const label = Array.isArray(s.label) ? s.label.join(", ") : s.label;
      const text = `validation image #${s.index}, label ${label}`;
      const picked = { image: s.input, label: s.label, index: s.index, text };
      const attrs = {
        type: "button",
        role: "listitem",
        title: text,
        "aria-label": text,
        dataset: { index: s.index, label },
        onclick: () => pick(picked),
      };
      return h("button.thumb", attrs, imageCanvas(s.input));
    });
    gallery.replaceChildren(...thumbs);
    if (!current && thumbs.length) thumbs[0].click();
  }
  load();

  const values = `${shapeText(shape)} values`;
  const upload = h("label.btn.small", { for: "image-file" }, "Upload…");
  const element = h(
    "div.picker",
    {},
    h("p.small.muted", {}, `Pick a validation image, or upload a PNG or a .npy of ${values}.`),
    gallery,
    h("div.picker-row", {}, preview, upload, file),
    error,
  );
  return { element, picked: () => current, onPick: (listen) => listeners.push(listen) };
}

// -- the first conv layer's filters ----------------------------------------------------------

// The filters card's body: each filter's input channels as small images, on one red-white-blue
// scale for the whole layer. `load(checkpoint)` draws the newest checkpoint's.
export function filtersView(jobId) {
  const grid = h("div.filter-grid", { id: "filters-grid" }, h("p.muted", {}, "Loading…"));
  const caption = h("p.small.muted", { id: "filters-caption" });

  async function load(checkpoint) {
    if (!checkpoint) {
      grid.replaceChildren(h("p.muted", {}, "The filters are shown after the first checkpoint."));
      return;
    }
    let f;
    try {
      f = await api(`/jobs/${jobId}/filters`);
    } catch (err) {
      grid.replaceChildren(h("p.muted", {}, errorText(err)));
      return;
    }
    const max = Math.max(...f.weights.flat(3).map(Math.abs));
    const colour = diverging(max);
    const channels = Math.min(f.shape[1], SHOWN_CHANNELS);
    const tiles = f.weights.map((filter, o) =>
      h(
        "figure.filter",
        { dataset: { filter: o } },
        filter.slice(0, channels).map((kernel, c) =>
          drawGrid(
            h("canvas.pixels", {
              dataset: { filter: o, channel: c },
              title: `filter ${o}, input channel ${c}`,
            }),
            kernel,
            colour,
          ),
        ),
        h("figcaption", {}, `#${o}`),
      ),
    );
    grid.replaceChildren(...tiles);
    const more = f.shown < f.shape[0] ? `, the first ${f.shown} shown` : "";
    const some = channels < f.shape[1] ? `, input channels 0–${channels - 1}` : "";
    const which = `layer ${f.layer} (${f.name}, ${shapeText(f.shape)}${more}${some})`;
    const scale = `blue positive, red negative, up to ±${max.toPrecision(3)}`;
    caption.textContent = `${which}; ${scale}; from checkpoint ${f.checkpoint}`;
    caption.dataset.max = max;
  }

  return { element: h("div.filters", {}, grid, caption), load };
}
