// Small DOM and formatting helpers shared by the views. Text goes in through textContent only:
// job names and errors are user input.

export function h(tag, attrs = {}, ...children) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") Object.assign(el.style, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export const badge = (status) => h(`span.badge.s-${status}`, {}, status);

export function empty(title, text, action) {
  return h("div.empty", {}, h("div.empty-title", {}, title), text && h("p", {}, text), action);
}

export function alert(message, kind = "error") {
  return h(`div.alert.${kind}`, { role: "alert" }, message);
}

// A validation message without Pydantic's "Value error, " prefix.
export const readable = (msg) => msg.replace(/^Value error, /, "");

export function errorText(err) {
  if (err?.status === 404) return "Not found.";
  return err?.message || String(err);
}

// A form's errors: each field's paragraph under it (`fields`: [{name, control, error}]) and
// one for the form. `show(err)` puts a 422's errors under the fields their locs name
// (["body", name, ...]), any other error under the form.
export function formErrors(fields, formError) {
  function clear() {
    for (const f of [...fields, { error: formError }]) {
      f.error.hidden = true;
      f.error.replaceChildren();
      f.control?.removeAttribute("aria-invalid");
    }
  }
  function put(name, message) {
    const f = fields.find((x) => x.name === name);
    const error = f ? f.error : formError;
    error.append(error.childNodes.length ? `; ${message}` : message);
    error.hidden = false;
    f?.control.setAttribute("aria-invalid", "true");
  }
  function show(err) {
    if (err.status === 422 && Array.isArray(err.detail)) {
      for (const e of err.detail) put(e.loc?.[0] === "body" ? e.loc[1] : null, readable(e.msg));
    } else {
      put(null, errorText(err));
    }
  }
  return { clear, put, show };
}

// -- numbers and times -------------------------------------------------------------------

export function num(x, digits = 4) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return Number(x.toPrecision(digits)).toString();
}

export const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

export function bytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(hrs / 24)}d ${hrs % 24}h`;
}

const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toDateString() === new Date().toDateString() ? timeOnly.format(d) : dateTime.format(d);
}

export const fullTime = (iso) => (iso ? new Date(iso).toLocaleString() : "");

// How long a job has run (or waited, while queued); null when there is nothing to show.
export function elapsed(job, now = Date.now()) {
  const start = job.started_at || (job.status === "queued" ? job.created_at : null);
  if (!start) return null;
  const end = TERMINAL.has(job.status) && job.finished_at ? Date.parse(job.finished_at) : now;
  return (end - Date.parse(start)) / 1000;
}

export const shortId = (id) => (id && id.length > 10 ? id.slice(0, 8) : id);

// -- job pieces used by the list and the job page ---------------------------------------

export function progressBar(job) {
  const p = job.progress;
  const fraction = p.fraction ?? (job.status === "succeeded" ? 1 : 0);
  return h(
    `div.bar.s-${job.status}`,
    {
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": Math.round(100 * fraction),
    },
    h("div.bar-fill", { style: { width: `${(100 * fraction).toFixed(1)}%` } }),
  );
}

// "120 / 300 steps · ETA 12s", with the epoch too when `withEpoch`.
export function stepText(job, withEpoch = false) {
  const p = job.progress;
  if (job.status === "queued" && job.queue_position) {
    return `#${job.queue_position} in queue`;
  }
  if (!p.total_steps) {
    if (job.status === "queued") return "queued";
    return job.started_at ? "starting…" : "never started";
  }
  const parts = [`${p.step.toLocaleString()} / ${p.total_steps.toLocaleString()} steps`];
  if (withEpoch && p.step > 0) parts.push(`epoch ${p.epoch + 1} of ${job.spec.epochs}`);
  if (job.status === "running" && p.eta_s !== null && p.eta_s !== undefined) {
    parts.push(`ETA ${duration(p.eta_s)}`);
  }
  return parts.join(" · ");
}

// How many workers a count is: "in-process" for 0, "auto" before an auto run has chosen.
export const workerCount = (n) =>
  n === 0 ? "in-process" : n === "auto" ? "auto" : `${n} worker${n === 1 ? "" : "s"}`;

// "2 workers · 1 node", with the nodes' addresses when the cluster told us them. The count
// is the run's (what auto chose, once started), else the spec's. A running job on workers
// with no nodes yet is starting them (its first steps run on the coordinator meanwhile).
export function workersText(job, nodeNames = new Map()) {
  const text = workerCount(job.workers ?? job.spec?.workers ?? job.worker_nodes.length);
  const nodes = [...new Set(job.worker_nodes)];
  if (!nodes.length) return [text, job.status === "running" && job.workers > 0 ? "starting" : ""];
  const names = nodes.map((id) => nodeNames.get(id) || shortId(id));
  return [text, `on ${names.join(", ")}`];
}

// Re-run `fn` every second until stopped (live durations and ETAs).
export function ticker(fn) {
  const id = setInterval(fn, 1000);
  return () => clearInterval(id);
}

// JSON laid out for reading: short objects and arrays stay on one line.
export function pretty(value, indent = "") {
  const flat = oneLine(value);
  const fits = indent && flat.length + indent.length <= 88;
  if (value === null || typeof value !== "object" || fits) return flat;
  const inner = `${indent}  `;
  const items = Array.isArray(value)
    ? value.map((v) => inner + pretty(v, inner))
    : Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pretty(v, inner)}`);
  const [open, close] = Array.isArray(value) ? ["[", "]"] : ["{", "}"];
  return `${open}\n${items.join(",\n")}\n${indent}${close}`;
}

function oneLine(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(oneLine).join(", ")}]`;
  const items = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${oneLine(v)}`);
  return `{${items.join(", ")}}`;
}

export const tile = (label, value, sub, cls = "") =>
  h(
    `div.tile${cls}`,
    {},
    h("div.k", {}, label),
    h("div.v", {}, value),
    sub && h("div.sub", {}, sub),
  );

// A scrollable table; the columns named in `numeric` are right-aligned.
export function table(head, rows, { numeric = [], id } = {}) {
  const th = (t) => h(numeric.includes(t) ? "th.num" : "th", {}, t);
  return h(
    "div.table-wrap",
    {},
    h("table", { id }, h("thead", {}, h("tr", {}, ...head.map(th))), h("tbody", {}, ...rows)),
  );
}
