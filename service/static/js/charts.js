// The job page's curves, drawn with plotly.js (served from the installed plotly package and
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

const COLORS = { train: "#2563eb", val: "#ea580c", acc: "#16a34a", grad: "#7c3aed" };
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

// The loss curves, and beside them the validation accuracy of a classifier or the gradient
// norm of a regression. Redraws at most once a frame (once a second for very long runs).
export class Curves {
  constructor(lossDiv, sideDiv, { classify, lossName }) {
    Object.assign(this, { lossDiv, sideDiv, classify, lossName, log: false, points: [] });
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
    const loss = [
      line(pts, "train_loss", "train loss", COLORS.train, false),
      line(pts, "val_loss", "validation loss", COLORS.val, true),
    ];
    const yType = { type: this.log ? "log" : "linear" };
    const none = pts.length ? null : "No points yet: the first comes after one step";
    await Plotly.react(this.lossDiv, loss, layout(`loss (${this.lossName})`, yType, none), CONFIG);
    if (this.classify) {
      const acc = [line(pts, "val_accuracy", "validation accuracy", COLORS.acc, true)];
      const yaxis = { tickformat: ".0%", range: [0, 1.02] };
      const noVal = acc[0].x.length ? null : "Validated at the end of each epoch";
      await Plotly.react(this.sideDiv, acc, layout("accuracy", yaxis, noVal), CONFIG);
    } else {
      const grad = [line(pts, "grad_norm", "gradient norm", COLORS.grad, false)];
      const yaxis = { rangemode: "tozero" };
      await Plotly.react(this.sideDiv, grad, layout("gradient norm", yaxis, none), CONFIG);
    }
  }

  purge() {
    clearTimeout(this.pending);
    if (window.Plotly) for (const div of [this.lossDiv, this.sideDiv]) window.Plotly.purge(div);
  }
}
