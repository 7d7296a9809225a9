// The job page's charts, drawn with plotly.js (served from the installed plotly package and
// loaded only when a chart is first needed: the jobs list does not pay for its 4.8 MB).

let loading = null;

export function plotly() {
  loading ??= new Promise((resolve, reject) => {
    if (window.Plotly) return resolve(window.Plotly);
    const script = document.createElement("script");
    script.src = "/static/vendor/plotly.min.js";
    script.onload = () => resolve(window.Plotly);
    script.onerror = () => {
      loading = null;
      reject(new Error("could not load /static/vendor/plotly.min.js"));
    };
    document.head.append(script);
  });
  return loading;
}

const COLORS = {
  train: "#2563eb",
  val: "#ea580c",
  acc: "#16a34a",
  exact: "#db2777",
  grad: "#7c3aed",
  lr: "#94a3b8",
};
const LAYERS = ["#2563eb", "#ea580c", "#16a34a", "#7c3aed", "#db2777", "#0891b2", "#ca8a04"];
const SIGN = { positive: "#2563eb", negative: "#dc2626" };
const GRID = "#e8ebf0";
const CONFIG = {
  displaylogo: false,
  responsive: true,
  modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d", "toImage"],
};

function layout(yTitle, yaxis = {}, emptyText = null) {
  const font = getComputedStyle(document.body).fontFamily;
  const y = { title: { text: yTitle }, gridcolor: GRID, zeroline: false, automargin: true };
  const note = { xref: "paper", yref: "paper", x: 0.5, y: 0.5, showarrow: false };
  const muted = { size: 13, color: "#64748b" };
  return {
    annotations: emptyText ? [{ ...note, text: emptyText, font: muted }] : [],
    height: 300,
    margin: { l: 58, r: 14, t: 30, b: 44 },
    font: { family: font, size: 12, color: "#334155" },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    xaxis: { title: { text: "step" }, gridcolor: GRID, zeroline: false, rangemode: "tozero" },
    yaxis: { ...y, ...yaxis },
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    hovermode: "x unified",
    uirevision: "keep", // keep the reader's zoom while points stream in
  };
}

function line(points, key, name, color, markers) {
  const xs = [];
  const ys = [];
  for (const p of points) {
    if (p[key] === null || p[key] === undefined) continue;
    xs.push(p.step);
    ys.push(p[key]);
  }
  return {
    type: "scatter",
    mode: markers ? "lines+markers" : "lines",
    name,
    x: xs,
    y: ys,
    line: { color, width: markers ? 2 : 1.5 },
    marker: { size: 5 },
    hovertemplate: "%{y:.4g}",
  };
}

const LR_AXIS = {
  title: { text: "learning rate" },
  overlaying: "y",
  side: "right",
  showgrid: false,
  zeroline: false,
  rangemode: "tozero",
  tickformat: ".2~g",
  automargin: true,
};

// One line per layer: its gradient norm at each health check (the points with `layers`).
function layerLines(points) {
  const byLayer = new Map();
  for (const p of points) {
    for (const l of p.layers || []) {
      if (!byLayer.has(l.layer)) byLayer.set(l.layer, []);
      byLayer.get(l.layer).push({ step: p.step, grad_norm: l.grad_norm });
    }
  }
  return [...byLayer].map(([name, pts], i) =>
    line(pts, "grad_norm", name, LAYERS[i % LAYERS.length], true),
  );
}

// A log y axis labelled at 1, 2 and 5 of each decade over up to three decades (plotly's own
// choice labels every digit there, and the labels crowd); over more, plotly's decades.
function logAxis(traces) {
  const ys = traces.flatMap((t) => t.y).filter((v) => v > 0);
  const span = ys.length ? Math.log10(Math.max(...ys) / Math.min(...ys)) : 0;
  return { type: "log", tickformat: ".2~g", ...(span > 0.5 && span <= 3 ? { dtick: "D2" } : {}) };
}

// A log scale cannot draw a zero norm (a layer whose units are all dead): say so.
const offTheScale = (names) => ({
  xref: "paper",
  yref: "paper",
  x: 1,
  y: 1,
  xanchor: "right",
  yanchor: "bottom",
  showarrow: false,
  text: `${names.join(", ")}: gradient norm 0, below the log scale`,
  font: { size: 11, color: "#b91c1c" },
});

// The loss curves, and beside them the validation accuracy of a classifier or the gradient
// norm of a regression; with `healthDiv`, the per-layer gradient norms too. Redraws at most
// once a frame (once a second for very long runs).
export class Curves {
  constructor(lossDiv, sideDiv, { classify, lossName, healthDiv = null }) {
    Object.assign(this, {
      lossDiv,
      sideDiv,
      healthDiv,
      classify,
      lossName,
      log: false,
      points: [],
    });
    this.pending = null;
    this.lastDraw = 0;
  }

  update(points) {
    this.points = points;
    if (this.pending) return;
    const wait = points.length > 5000 ? Math.max(0, 1000 - (Date.now() - this.lastDraw)) : 0;
    this.pending = setTimeout(() => requestAnimationFrame(() => this.draw()), wait);
  }

  setLog(log) {
    this.log = log;
    this.update(this.points);
  }

  async draw() {
    const Plotly = await plotly();
    this.pending = null;
    this.lastDraw = Date.now();
    const pts = this.points;
    // The learning rate of each step (optimizer.schedule) on its own axis, at the right.
    const lr = { ...line(pts, "lr", "learning rate", COLORS.lr, false), yaxis: "y2" };
    lr.line.dash = "dot";
    const loss = [
      line(pts, "train_loss", "train loss", COLORS.train, false),
      line(pts, "val_loss", "validation loss", COLORS.val, true),
      lr,
    ];
    const yType = { type: this.log ? "log" : "linear" };
    const none = pts.length ? null : "No points yet: the first comes after one step";
    const plot = layout(`loss (${this.lossName})`, yType, none);
    plot.yaxis2 = { ...LR_AXIS, visible: lr.x.length > 0 };
    plot.margin.r = lr.x.length ? 58 : plot.margin.r;
    await Plotly.react(this.lossDiv, loss, plot, CONFIG);
    if (this.classify) {
      // A builtin sequence task's exact match (issue 15) shares the accuracy chart.
      const acc = [
        line(pts, "val_accuracy", "validation accuracy", COLORS.acc, true),
        line(pts, "val_exact_match", "validation exact match", COLORS.exact, true),
      ].filter((trace, i) => i === 0 || trace.x.length);
      const yaxis = { tickformat: ".0%", range: [0, 1.02] };
      const noVal = acc.some((t) => t.x.length) ? null : "Validated at the end of each epoch";
      await Plotly.react(this.sideDiv, acc, layout("accuracy", yaxis, noVal), CONFIG);
    } else {
      const grad = [line(pts, "grad_norm", "gradient norm", COLORS.grad, false)];
      const yaxis = { rangemode: "tozero" };
      await Plotly.react(this.sideDiv, grad, layout("gradient norm", yaxis, none), CONFIG);
    }
    if (this.healthDiv) {
      const layers = layerLines(pts);
      const noChecks = layers.length ? null : "No health checks yet";
      const plot = layout("gradient norm", logAxis(layers), noChecks);
      const zero = layers.filter((t) => t.y.includes(0)).map((t) => t.name);
      if (zero.length) plot.annotations.push(offTheScale(zero));
      await Plotly.react(this.healthDiv, layers, plot, CONFIG);
    }
  }

  purge() {
    clearTimeout(this.pending);
    const divs = [this.lossDiv, this.sideDiv, this.healthDiv].filter(Boolean);
    if (window.Plotly) for (const div of divs) window.Plotly.purge(div);
  }
}

// Horizontal bars, one per input feature (x0 at the top), coloured by sign.
export async function drawAttributions(div, values) {
  const Plotly = await plotly();
  const bars = {
    type: "bar",
    orientation: "h",
    x: values,
    y: values.map((_, i) => `x${i}`),
    marker: { color: values.map((v) => (v < 0 ? SIGN.negative : SIGN.positive)) },
    hovertemplate: "%{y}: %{x:.4g}<extra></extra>",
  };
  const base = layout("feature", { type: "category", autorange: "reversed" });
  const xaxis = { ...base.xaxis, title: { text: "attribution" }, rangemode: "normal" };
  Object.assign(base, {
    xaxis: { ...xaxis, zeroline: true, zerolinecolor: "#94a3b8" },
    height: Math.min(900, Math.max(200, 70 + 22 * values.length)),
    hovermode: "closest",
    showlegend: false,
    uirevision: null, // each explanation starts unzoomed
  });
  await Plotly.react(div, [bars], base, CONFIG);
}

// Attributions of a C×H×W image as a heatmap over it: the image in grey (its channels' mean),
// and above it, partly transparent, the attributions summed over the channels, coloured as the
// bars are (blue positive, red negative) on a scale symmetric about zero.
export async function drawHeatmap(div, image, attributions) {
  const Plotly = await plotly();
  const mean = (img) =>
    img[0].map((row, y) => row.map((_, x) => img.reduce((s, c) => s + c[y][x], 0) / img.length));
  const sum = (img) => mean(img).map((row) => row.map((v) => v * img.length));
  const z = sum(attributions);
  const max = Math.max(...z.flat().map((v) => Math.abs(v ?? 0))) || 1;
  const picture = {
    type: "heatmap",
    z: mean(image),
    colorscale: "Greys",
    reversescale: true,
    showscale: false,
    hoverinfo: "skip",
  };
  const heat = {
    type: "heatmap",
    z,
    zmin: -max,
    zmax: max,
    colorscale: [
      [0, SIGN.negative],
      [0.5, "rgba(255,255,255,0)"],
      [1, SIGN.positive],
    ],
    opacity: 0.7,
    colorbar: { title: { text: "attribution" }, thickness: 12 },
    hovertemplate: "row %{y}, column %{x}: %{z:.4g}<extra></extra>",
  };
  const axis = { showgrid: false, zeroline: false, ticks: "", showticklabels: false };
  const base = {
    ...layout("", {}),
    height: 340,
    margin: { l: 10, r: 10, t: 10, b: 10 },
    xaxis: { ...axis, constrain: "domain" },
    yaxis: { ...axis, autorange: "reversed", scaleanchor: "x" },
    hovermode: "closest",
    uirevision: null,
  };
  await Plotly.react(div, [picture, heat], base, CONFIG);
}

// A colour per run on the pages that overlay runs (compare, sweep).
export const RUN_COLORS = [
  "#2563eb",
  "#ea580c",
  "#16a34a",
  "#7c3aed",
  "#db2777",
  "#0891b2",
  "#ca8a04",
  "#dc2626",
  "#4f46e5",
  "#65a30d",
];
export const runColor = (i) => RUN_COLORS[i % RUN_COLORS.length];

// Several runs' curves on one chart: for each run ({name, color, series, marked}) a line per
// metric of `metrics` ([key, label, dash]), from its {steps, values} series (GET /compare).
// A `marked` run (a pruned trial) is dotted and ends in a cross.
export async function drawRuns(
  div,
  runs,
  metrics,
  { yTitle, yaxis = {}, legend = true, emptyText = "Nothing measured yet" },
) {
  const Plotly = await plotly();
  const traces = [];
  for (const run of runs) {
    for (const [key, label, dash] of metrics) {
      const s = run.series?.[key];
      if (!s?.steps.length) continue;
      const n = s.steps.length;
      const note = run.marked ? " (pruned)" : "";
      traces.push({
        type: "scatter",
        mode: run.marked ? "lines+markers" : "lines",
        name: metrics.length > 1 ? `${run.name} · ${label}` : run.name,
        legendgroup: run.name,
        x: s.steps,
        y: s.values,
        line: { color: run.color, width: 1.8, dash: run.marked ? "dot" : dash || "solid" },
        marker: {
          symbol: "x",
          size: s.steps.map((_, i) => (i === n - 1 ? 9 : 0)),
          color: run.color,
        },
        hovertemplate: `${run.name}${note}: %{y:.4g}<extra>${label}</extra>`,
      });
    }
  }
  const none = traces.length ? null : emptyText;
  const plot = layout(yTitle, yaxis, none);
  Object.assign(plot, { hovermode: "closest", showlegend: legend, height: 320 });
  await Plotly.react(div, traces, plot, CONFIG);
  return traces.length;
}

// A parameter against a metric, one point per run (the sweep page's scatter plots).
export async function drawScatter(div, points, { xTitle, yTitle, log = false }) {
  const Plotly = await plotly();
  const trace = {
    type: "scatter",
    mode: "markers",
    x: points.map((p) => p.x),
    y: points.map((p) => p.y),
    text: points.map((p) => p.label),
    marker: {
      size: 9,
      color: points.map((p) => p.color),
      symbol: points.map((p) => (p.marked ? "x" : "circle")),
      line: { width: 0 },
    },
    hovertemplate: `%{text}<br>${xTitle}: %{x}<br>${yTitle}: %{y:.4g}<extra></extra>`,
  };
  const plot = layout(yTitle);
  plot.xaxis = { ...plot.xaxis, title: { text: xTitle }, rangemode: "normal" };
  if (log) plot.xaxis.type = "log";
  Object.assign(plot, { hovermode: "closest", showlegend: false, height: 260 });
  plot.margin.t = 14;
  await Plotly.react(div, [trace], plot, CONFIG);
}
