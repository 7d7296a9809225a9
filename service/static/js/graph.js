// The job page's graph view: the computational graph of the loss at the newest checkpoint
// (GET /jobs/{id}/graph), laid out by dagre (vendored from npm, loaded on first use) and drawn
// as SVG. A node's fill follows the norm of the gradient that reached it, on a log scale
// across the graph; clicking one shows its output and gradient.

import { api, apiUrl, download } from "./api.js";
import { errorText, h, num } from "./ui.js";

let loading = null;
const dagre = () => {
  loading ??= import("../vendor/dagre/dagre.esm.js").catch((err) => {
    loading = null;
    throw err;
  });
  return loading;
};

// -- values as exported by core/graph.py: numbers, nested lists, summaries, "NaN" strings --

// The L2 norm of an output or gradient; Infinity when any value is not finite, null for none.
function norm(values) {
  if (values === null || values === undefined) return null;
  if (typeof values === "object" && !Array.isArray(values)) return Number(values.norm);
  let sum = 0;
  for (const v of [values].flat(Infinity)) sum += Number(v) ** 2;
  return Number.isFinite(sum) ? Math.sqrt(sum) : Infinity;
}

const shapeText = (shape) => (shape.length ? shape.join("×") : "scalar");

// A vector on one line, a matrix one row a line, a summary as its statistics.
function valuesText(values) {
  if (values === null || values === undefined) return "none";
  if (typeof values === "string") return values; // "NaN", "Infinity", "-Infinity"
  if (typeof values === "number") return num(values);
  if (Array.isArray(values)) {
    const items = values.map(valuesText);
    return values.some(Array.isArray) ? items.join("\n") : `[${items.join(", ")}]`;
  }
  const { shape, ...stats } = values; // min, max, mean, norm
  const parts = Object.entries(stats).map(([k, v]) => `${k} ${valuesText(v)}`);
  return `${shapeText(shape)}, summarised: ${parts.join(" · ")}`;
}

// -- colours ------------------------------------------------------------------------------

// Pale yellow (small gradients) to dark blue (large): a sequential scale that stays readable
// for colour-blind readers and leaves red to gradients that are not finite.
const SCALE = ["#ffffcc", "#c7e9b4", "#7fcdbb", "#41b6c4", "#2c7fb8", "#253494"];
const NONE = "#ffffff";
const ZERO = "#e5e7eb";
const NON_FINITE = "#dc2626";

function scaleColour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (SCALE.length - 1);
  const i = Math.min(Math.floor(x), SCALE.length - 2);
  const [a, b] = [SCALE[i], SCALE[i + 1]].map((c) =>
    [1, 3, 5].map((k) => parseInt(c.slice(k, k + 2), 16)),
  );
  const mix = a.map((v, k) => Math.round(v + (b[k] - v) * (x - i)));
  return `rgb(${mix.join(", ")})`;
}

// Fill and text colour for every node, and the log10 range the scale spans.
function colours(nodes) {
  const logs = nodes
    .map((n) => n.norm)
    .filter((v) => v > 0 && Number.isFinite(v))
    .map(Math.log10);
  const lo = Math.min(...logs);
  const hi = Math.max(...logs);
  const fill = (v) => {
    if (v === null) return [NONE, "#1e293b"];
    if (!Number.isFinite(v)) return [NON_FINITE, "#fff"];
    if (v === 0) return [ZERO, "#1e293b"];
    const t = hi > lo ? (Math.log10(v) - lo) / (hi - lo) : 1;
    return [scaleColour(t), t > 0.6 ? "#fff" : "#1e293b"];
  };
  return { fill: nodes.map((n) => fill(n.norm)), range: logs.length ? [lo, hi] : null };
}

function legend(range) {
  const swatch = (cls, colour, text) =>
    h("span.key", {}, h(`span.swatch${cls}`, { style: { background: colour } }), text);
  const scale = range && [
    h("span.small.muted", {}, `‖∇‖ ${num(10 ** range[0])}`),
    h("span.scale-bar", { style: { background: `linear-gradient(90deg, ${SCALE.join(", ")})` } }),
    h("span.small.muted", {}, num(10 ** range[1])),
  ];
  return h(
    "div.graph-legend",
    {},
    h("span.key", {}, scale),
    swatch("", NONE, "no gradient"),
    swatch("", ZERO, "zero"),
    swatch("", NON_FINITE, "NaN / ∞"),
    swatch(".k-parameter", NONE, "parameter"),
    swatch(".k-source", NONE, "data / constant"),
    swatch(".k-root", NONE, "loss"),
  );
}

// -- drawing ------------------------------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";
const AFTER_CHECKPOINT = "The graph is available after the first checkpoint.";

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  el.append(...children);
  return el;
}

function kind(node, root) {
  if (node.id === root) return "root";
  return node.operation === "parameter" || node.operation === "source" ? node.operation : "op";
}

function labelLines(node) {
  const grad =
    node.norm === null ? "∇ none" : `‖∇‖ ${Number.isFinite(node.norm) ? num(node.norm) : "NaN/∞"}`;
  const shape = shapeText(node.shape);
  return [node.operation, node.name ? `${node.name} · ${shape}` : shape, grad];
}

async function layout(nodes) {
  const { graphlib, layout: run } = await dagre();
  const g = new graphlib.Graph({ multigraph: true });
  g.setGraph({ rankdir: "TB", nodesep: 18, ranksep: 34, marginx: 4, marginy: 4 });
  for (const n of nodes) {
    const chars = Math.max(...labelLines(n).map((t) => t.length));
    g.setNode(String(n.id), { width: Math.max(92, 7.2 * chars + 22), height: 58 });
  }
  for (const n of nodes) {
    n.inputs.forEach((i, k) => g.setEdge(String(i), String(n.id), {}, `${k}`)); // a + a: 2 edges
  }
  run(g);
  return g;
}

function drawNode(node, box, [fill, ink], root, select) {
  const x = box.x - box.width / 2;
  const y = box.y - box.height / 2;
  const lines = labelLines(node);
  const texts = lines.map((t, k) =>
    svg("text", { x: box.x, y: y + 17 + 16 * k, fill: ink, class: k ? "g-sub" : "g-op" }, t),
  );
  const tip = `#${node.id} ${node.operation} · ${shapeText(node.shape)} · ${lines[2]}`;
  const g = svg(
    "g",
    {
      class: `g-node g-${kind(node, root)}`,
      tabindex: "0",
      role: "button",
      "data-id": node.id,
      "data-op": node.operation,
      "data-fill": fill,
      "aria-label": tip,
    },
    svg("title", {}, tip),
    svg("rect", { x, y, width: box.width, height: box.height, rx: 7, fill }),
    ...texts,
  );
  g.addEventListener("click", () => select(node.id));
  g.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      select(node.id);
    }
  });
  return g;
}

function drawEdge(points) {
  const [first, ...rest] = points;
  const d = `M${first.x},${first.y}${rest.map((p) => `L${p.x},${p.y}`).join("")}`;
  return svg("path", { d, class: "g-edge", "marker-end": "url(#g-arrow)" });
}

function picture(g, nodes, fills, root, select) {
  const { width, height } = g.graph();
  const arrow = svg(
    "marker",
    {
      id: "g-arrow",
      viewBox: "0 0 10 10",
      refX: 9,
      refY: 5,
      markerWidth: 7,
      markerHeight: 7,
      orient: "auto",
    },
    svg("path", { d: "M0,0L10,5L0,10z", class: "g-arrowhead" }),
  );
  const edges = g.edges().map((e) => drawEdge(g.edge(e).points));
  const boxes = nodes.map((n, i) => drawNode(n, g.node(String(n.id)), fills[i], root, select));
  return svg(
    "svg",
    {
      id: "graph-svg",
      viewBox: `0 0 ${width} ${height}`,
      width, // natural size for small graphs; CSS shrinks large ones to the card
      role: "img",
      "aria-label": `computational graph of the loss, ${nodes.length} nodes`,
    },
    svg("defs", {}, arrow),
    ...edges,
    ...boxes,
  );
}

function details(node, byId) {
  if (!node) return h("p.small.muted", {}, "Click a node to see its output and gradient.");
  const inputs = node.inputs.map((i) => `#${i} ${byId.get(i).operation}`).join(", ");
  const block = (title, values) =>
    h("div", {}, h("div.k", {}, title), h("pre.values", {}, valuesText(values)));
  return h(
    "div.graph-detail-body",
    {},
    h(
      "div.graph-detail-head",
      {},
      h("strong", {}, `#${node.id} ${node.operation}`),
      h("span.muted", {}, shapeText(node.shape)),
    ),
    inputs && h("div.small.muted", {}, `inputs: ${inputs}`),
    block("output", node.output),
    block("gradient", node.gradient),
  );
}

// The graph card's body. `load(checkpoint)` fetches and draws the graph of the newest
// checkpoint (again: the view keeps the selected node); there is none before the first.
export function graphView(jobId) {
  const drawing = h("div.graph-picture", { id: "graph-view" }, h("p.muted", {}, "Loading…"));
  const detail = h("div.graph-detail", { id: "graph-detail", "aria-live": "polite" });
  const path = `/jobs/${jobId}/graph?format=dot`;
  const filename = `${jobId}-graph.dot`;
  const attrs = { id: "graph-dot", href: apiUrl(path), download: filename, hidden: true };
  const dot = h("a.small", attrs, "Download DOT");
  dot.addEventListener("click", (e) => {
    e.preventDefault(); // a plain link cannot carry the API token
    download(path, filename).catch((err) => window.alert(errorText(err)));
  });
  const legendSlot = h("div");
  let selected = null;
  let latest = 0; // loads may overlap; only the newest draws

  const pending = (text) => drawing.replaceChildren(h("p.muted", { id: "graph-pending" }, text));

  async function load(checkpoint) {
    const mine = ++latest;
    if (!checkpoint) {
      pending(AFTER_CHECKPOINT);
      return;
    }
    let graph;
    try {
      graph = await api(`/jobs/${jobId}/graph?format=json`);
    } catch (err) {
      if (mine === latest) pending(err.status === 409 ? AFTER_CHECKPOINT : errorText(err));
      return;
    }
    const nodes = graph.nodes.map((n) => ({ ...n, norm: norm(n.gradient) }));
    const byId = new Map(nodes.map((n) => [n.id, n]));
    const { fill, range } = colours(nodes);
    const select = (id) => {
      selected = id;
      for (const el of drawing.querySelectorAll(".g-node")) {
        el.classList.toggle("selected", Number(el.dataset.id) === id);
      }
      detail.replaceChildren(details(byId.get(id), byId));
    };
    const g = await layout(nodes);
    if (mine !== latest) return;
    drawing.replaceChildren(picture(g, nodes, fill, graph.root, select));
    dot.hidden = false;
    legendSlot.replaceChildren(legend(range));
    if (byId.has(selected)) select(selected);
    else detail.replaceChildren(details(null, byId));
  }

  const element = h("div.graph", {}, legendSlot, drawing, detail);
  return { element, dot, load };
}
