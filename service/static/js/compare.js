// #/compare?ids=a,b,c — jobs side by side (GET /compare): their loss and accuracy curves
// overlaid, and a table of the spec fields that differ and the final metrics, the best value
// of each metric highlighted. Jobs are picked with the checkboxes of the jobs list.

import { api } from "./api.js";
import { drawRuns, runColor } from "./charts.js";
import { alert, badge, duration, empty, errorText, h, num, pct } from "./ui.js";

// The final metrics the table shows, and which way is better.
export const METRICS = [
  ["train_loss", "train loss", "min", num],
  ["val_loss", "val loss", "min", num],
  ["val_accuracy", "val accuracy", "max", pct],
  ["val_exact_match", "val exact match", "max", pct],
];
const LOSSES = [
  ["train_loss", "train", "solid"],
  ["val_loss", "val", "dash"],
];
const ACCURACY = [
  ["val_accuracy", "val accuracy", "solid"],
  ["val_exact_match", "exact match", "dash"],
];

// The runs' indices whose value is the best (several on a tie); none if fewer than two have one.
export function best(values, mode) {
  const known = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  if (known.length < 2) return new Set();
  const top = mode === "min" ? Math.min(...known) : Math.max(...known);
  return new Set(values.flatMap((v, i) => (v === top ? [i] : [])));
}

export const shown = (v) =>
  v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v);

function comparisonTable(cmp) {
  const jobs = cmp.jobs;
  const head = h(
    "tr",
    {},
    h("th", {}, ""),
    jobs.map((j, i) =>
      h(
        "th",
        { "data-id": j.id },
        h("span.swatch", { style: { background: runColor(i) } }),
        h("a", { href: `#/jobs/${j.id}` }, j.name),
        " ",
        badge(j.status),
      ),
    ),
  );
  const section = (title) => h("tr.section", {}, h("th", { colspan: jobs.length + 1 }, title));
  const row = (label, cells, attrs = {}) => h("tr", attrs, h("th", {}, label), cells);
  const params = cmp.differs.filter((p) => p !== "name");
  const rows = [section(params.length ? "Parameters that differ" : "Same parameters")];
  for (const path of params) {
    const cells = jobs.map((j) => h("td.num.mono", {}, shown(j.values[path])));
    rows.push(row(path, cells, { "data-param": path }));
  }
  rows.push(section("Final metrics"));
  for (const [key, label, mode, fmt] of METRICS) {
    const values = jobs.map((j) => j.metrics[key] ?? null);
    if (values.every((v) => v === null)) continue;
    const top = best(values, mode);
    const cell = (v, i) =>
      top.has(i) ? h("td.num.best", { title: "best" }, fmt(v)) : h("td.num", {}, fmt(v));
    const cells = values.map(cell);
    rows.push(row(label, cells, { "data-metric": key }));
  }
  rows.push(row("best step", jobs.map((j) => h("td.num", {}, shown(j.best_step)))));
  rows.push(row("duration", jobs.map((j) => h("td.num", {}, duration(j.duration_s)))));
  return h(
    "div.table-wrap",
    {},
    h("table.compare-table", { id: "compare-table" }, h("thead", {}, head), h("tbody", {}, rows)),
  );
}

export function compareView(root, query) {
  const ids = (query.get("ids") || "").split(",").filter(Boolean);
  const lossDiv = h("div.chart", { id: "compare-loss" });
  const accDiv = h("div.chart", { id: "compare-acc" });
  const tableCard = h("section.card.wide", {}, h("h2", {}, "Parameters and final metrics"));
  const message = h("div");
  root.append(
    h("a.back", { href: "#/" }, "← All jobs"),
    h("div.page-head", {}, h("h1", {}, `Compare ${ids.length} jobs`)),
    message,
  );
  if (ids.length < 2) {
    root.append(empty("Pick two jobs or more", "Tick jobs in the list, then Compare."));
    return null;
  }
  root.append(
    h(
      "div.grid-2",
      {},
      h("section.card", {}, h("h2", {}, "Loss"), lossDiv),
      h("section.card", {}, h("h2", {}, "Validation accuracy"), accDiv),
    ),
    tableCard,
  );
  let alive = true;
  (async () => {
    try {
      const cmp = await api(`/compare?ids=${encodeURIComponent(ids.join(","))}`);
      if (!alive) return;
      const runs = cmp.jobs.map((j, i) => ({ name: j.name, color: runColor(i), series: j.series }));
      tableCard.append(comparisonTable(cmp));
      await drawRuns(lossDiv, runs, LOSSES, { yTitle: "loss" });
      const yaxis = { tickformat: ".0%", range: [0, 1.02] };
      const emptyText = "No job measured a validation accuracy (regressions do not)";
      await drawRuns(accDiv, runs, ACCURACY, { yTitle: "accuracy", yaxis, emptyText });
    } catch (err) {
      if (alive) message.replaceChildren(alert(`Could not compare: ${errorText(err)}`));
    }
  })();
  return () => {
    alive = false;
    if (window.Plotly) for (const div of [lossDiv, accDiv]) window.Plotly.purge(div);
  };
}
