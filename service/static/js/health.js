// The job page's training-health panel: the per-layer gradient norms over steps are drawn by
// Curves (charts.js) from the metric points that carry `layers`; this module renders the
// latest per-layer statistics and the warnings of GET /jobs/{id} (`health`).

import { badge, empty, h, num, pct, table } from "./ui.js";

// The newest per-layer statistics: from the job's health, or from a newer streamed point.
function latest(points, health) {
  const last = points.findLast((p) => p.layers?.length);
  if (last && (!health || last.step > health.step)) return { step: last.step, layers: last.layers };
  return health;
}

function layersTable(stats) {
  const rows = stats.layers.map((l) =>
    h(
      "tr",
      { dataset: { layer: l.layer } },
      h("td.mono", {}, l.layer),
      h("td.num", {}, num(l.grad_norm)),
      h("td.num", {}, num(l.weight_norm)),
      h("td.num", {}, num(l.update_ratio)),
      h("td.num", {}, pct(l.dead_fraction)),
    ),
  );
  const head = ["Layer", "Grad norm", "Weight norm", "Update ratio", "Dead"];
  return table(head, rows, { numeric: head.slice(1), id: "health-layers" });
}

const steps = (w) =>
  w.first_step === w.last_step ? `step ${w.first_step}` : `steps ${w.first_step}–${w.last_step}`;

function warningsList(warnings) {
  if (!warnings.length) {
    return h("p.health-ok", { id: "health-ok" }, "✓ No warnings: every layer looks healthy.");
  }
  const item = (w) =>
    h(
      "li",
      { dataset: { kind: w.kind, layer: w.layer } },
      badge(w.kind),
      h("span", {}, w.message),
      h("span.small.muted", {}, steps(w)),
    );
  return h("ul.health-warnings", { id: "health-warnings" }, warnings.map(item));
}

// The table and the warnings; `update` takes the job's metric points (oldest first) and health.
export function healthPanel() {
  const element = h("div.health-side");
  function update(points, health) {
    const stats = latest(points, health);
    if (!stats) {
      element.replaceChildren(
        empty("No health checks yet", "They are taken every health_every steps."),
      );
      return;
    }
    element.replaceChildren(
      h("div.small.muted", {}, `Latest check: step ${stats.step.toLocaleString()}`),
      layersTable(stats),
      h("h3", {}, "Warnings"),
      health ? warningsList(health.warnings) : h("p.muted", {}, "Checking…"),
    );
  }
  return { element, update };
}
