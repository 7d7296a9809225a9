// The job page's training-health panel: the per-layer gradient norms over steps are drawn by
// Curves (charts.js) from the metric points that carry `layers`; this module renders the
// latest per-layer statistics and the warnings of GET /jobs/{id} (`health`). A warning's
// `advice` names the spec field that addresses it and links to the job's spec with that
// change, as a template for a new job.

import { badge, empty, h, num, pct, pretty, table } from "./ui.js";

const DRAFT = "shardgrad.draft"; // read by the submit page

// RFC 7396: `patch` merged into `target` (null deletes a key); neither is modified.
export function mergePatch(target, patch) {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return patch;
  const out = target && typeof target === "object" && !Array.isArray(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

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

// "Fix: <field>" and, where one edit does it, the job's spec with that edit as a template.
function advice(w, spec) {
  if (!w.advice) return "";
  const { field, change } = w.advice;
  const use = () => sessionStorage.setItem(DRAFT, pretty(mergePatch(spec(), change)));
  const link =
    change &&
    h(
      "a.advice-template",
      { href: "#/submit", onclick: use, title: pretty(change) },
      "use as template with this change",
    );
  return h("span.small.advice", {}, "Fix: ", h("code", {}, field), link ? " · " : "", link || "");
}

function warningsList(warnings, spec) {
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
      advice(w, spec),
    );
  return h("ul.health-warnings", { id: "health-warnings" }, warnings.map(item));
}

// The table and the warnings; `update` takes the job's metric points (oldest first) and health.
// `spec()`: the job's spec, which a warning's advice changes into a template.
export function healthPanel(spec) {
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
      health ? warningsList(health.warnings, spec) : h("p.muted", {}, "Checking…"),
    );
  }
  return { element, update };
}
