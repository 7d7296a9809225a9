// #/jobs/<id> — one job: live progress and curves (the job's SSE stream), its training
// health, its computational graph, a CNN's first-layer filters, its timeline, checkpoints,
// spec, the cancel and resume buttons, boxes to predict and explain (on images, for a
// model that takes them), and its log (with a failed job's traceback).

import { api, apiUrl, download, stream } from "./api.js";
import { Curves } from "./charts.js";
import { nodeNames } from "./cluster.js";
import { explainBox } from "./explain.js";
import { graphView } from "./graph.js";
import { healthPanel } from "./health.js";
import { filtersView, imagePicker, takesImages } from "./images.js";
import { confirmDelete } from "./jobs.js";
import { attentionView, generateBox, tokenExplainBox } from "./lm.js";
import { logsPanel } from "./logs.js";
import { imagePredictBox, predictBox } from "./predict.js";
import {
  alert,
  badge,
  bytes,
  duration,
  elapsed,
  empty,
  errorText,
  fullTime,
  h,
  num,
  pct,
  pretty,
  progressBar,
  stepText,
  TERMINAL,
  table,
  ticker,
  tile,
  when,
  workersText,
} from "./ui.js";

const DRAFT = "shardgrad.draft"; // read by the submit page
// mse trains regressions, and also binary classifiers (whose points carry an accuracy).
const classifies = (job) => job.spec.loss !== "mse" || job.metrics?.val_accuracy != null;
const card = (title, ...body) => h("section.card", {}, h("h2", {}, title), ...body);
const back = () => h("a.back", { href: "#/" }, "← All jobs");

function timeline(events) {
  if (!events?.length) return empty("No events yet");
  const item = (e) =>
    h(
      `li.s-${e.status}`,
      {},
      h("span.dot", { "aria-hidden": "true" }),
      h(
        "div",
        {},
        h(
          "div.tl-head",
          {},
          badge(e.status),
          h("span.muted", {}, `attempt ${e.attempt}`),
          h("time.muted", { datetime: e.at, title: fullTime(e.at) }, when(e.at)),
        ),
        e.message && h(e.status === "failed" ? "div.err-text" : "div", {}, e.message),
      ),
    );
  return h("ol.timeline", {}, events.map(item));
}

function checkpointsTable(jobId, list) {
  if (!list.length) {
    return empty("No checkpoints yet", "The first is written after checkpoint_every steps.");
  }
  const rows = [...list].reverse().map((c) => {
    const path = `/jobs/${jobId}/checkpoints/${c.name}/model.safetensors`;
    const filename = `${jobId}-${c.name}-model.safetensors`;
    const link = h("a", { href: apiUrl(path), download: filename }, "model.safetensors");
    link.addEventListener("click", (e) => {
      e.preventDefault(); // a plain link cannot carry the API token
      download(path, filename).catch((err) => window.alert(errorText(err)));
    });
    return h(
      "tr",
      {},
      h("td", {}, c.name),
      h("td.num", {}, c.step.toLocaleString()),
      h("td", { title: fullTime(c.created_at) }, when(c.created_at)),
      h("td.num", {}, bytes(c.size_bytes)),
      h("td.mono.hash", { title: c.sha256 }, `${c.sha256.slice(0, 12)}…`),
      h("td", {}, link),
    );
  });
  const head = ["Name", "Step", "Created", "Size", "sha256", "Download"];
  return table(head, rows, { numeric: ["Step", "Size"], id: "checkpoints" });
}

function summaryTiles(job, names) {
  const m = job.metrics || {};
  const p = job.progress;
  const [workers, nodes] = workersText(job, names);
  const reason = job.workers_reason; // why this count: what auto measured, or the spec's
  const since = job.started_at ? `started ${when(job.started_at)}` : "";
  const rate = m.samples_per_s ? Math.round(m.samples_per_s).toLocaleString() : "–";
  return [
    tile("Step", p.step.toLocaleString(), p.total_steps && `of ${p.total_steps.toLocaleString()}`),
    tile("Train loss", num(m.train_loss)),
    tile("Validation loss", num(m.val_loss)),
    classifies(job) && tile("Validation accuracy", pct(m.val_accuracy)),
    tile("Samples / s", rate),
    tile(job.status === "queued" ? "Waiting" : "Duration", duration(elapsed(job)), since, ".tick"),
    tile("Workers", workers, [
      nodes,
      reason && h("div.workers-reason", { id: "workers-reason" }, reason),
    ]),
    tile("Attempts", String(job.attempts)),
  ];
}

// Every metric point of a job: GET /jobs/{id}/metrics a page at a time, following next_cursor.
async function allPoints(id) {
  const points = [];
  let cursor = null;
  do {
    const page = await api(`/jobs/${id}/metrics${cursor === null ? "" : `?cursor=${cursor}`}`);
    points.push(...page.points);
    cursor = page.next_cursor ?? null;
  } while (cursor !== null);
  return { points };
}

export function jobView(root, id) {
  let job = null;
  let live = null;
  let alive = true;
  let names = new Map();
  const points = new Map(); // step -> point; a recomputed step replaces its point
  let curves = null;
  let lastCheckpoints = 0;
  let lastJob = 0;
  let newestCheckpoint; // the graph is drawn again when it changes
  let explainer = null;

  const head = h("div.job-title");
  const summary = h("div");
  const problem = h("div");
  const lossDiv = h("div.chart", { id: "loss-chart" });
  const sideDiv = h("div.chart");
  const sideTitle = h("h2", {}, "Validation accuracy");
  const checkpoints = h("div", {}, h("p.muted", {}, "Loading…"));
  const events = h("div");
  const predict = h("div");
  const predictTitle = h("h2", {}, "Predict");
  const explain = h("div");
  const attention = h("div");
  const attentionCard = h(
    "section.card.wide",
    { id: "attention", hidden: true },
    h("h2", {}, "Attention"),
    attention,
  );
  const healthDiv = h("div.chart", { id: "health-chart" });
  const health = healthPanel(() => job.spec);
  const graph = graphView(id);
  const filters = filtersView(id);
  const filtersCard = h(
    "section.card.wide",
    { id: "filters", hidden: true },
    h("h2", {}, "First conv layer's filters"),
    filters.element,
  );
  const spec = h("div");
  const traceback = h("div", { id: "traceback" });
  let tracebackText = null;
  let shownTraceback = null;
  const logs = logsPanel(id, {
    onTraceback(text) {
      tracebackText = text;
      renderTraceback();
    },
  });
  const logToggle = h("input", { type: "checkbox", id: "log-y" });
  logToggle.addEventListener("change", () => curves?.setLog(logToggle.checked));
  const lossHead = h("label.small.muted", {}, logToggle, " log scale");

  root.append(
    back(),
    head,
    summary,
    problem,
    traceback,
    h(
      "div.grid-2",
      {},
      h("section.card", {}, h("div.card-head", {}, h("h2", {}, "Loss"), lossHead), lossDiv),
      h("section.card", {}, sideTitle, sideDiv),
    ),
    h(
      "section.card.wide",
      { id: "health" },
      h("h2", {}, "Training health"),
      h("div.grid-2.inner", {}, healthDiv, health.element),
    ),
    h(
      "section.card.wide",
      { id: "graph" },
      h("div.card-head", {}, h("h2", {}, "Computational graph of the loss"), graph.dot),
      graph.element,
    ),
    filtersCard,
    h(
      "div.grid-2",
      {},
      h("section.card", { id: "predict" }, predictTitle, predict),
      card("Explain", explain),
    ),
    attentionCard,
    h("div.grid-2", {}, card("Checkpoints", checkpoints), card("Timeline", events)),
    logs.element,
    h("section.card.wide", {}, h("h2", {}, "Spec"), spec),
  );

  async function act(action) {
    try {
      job = { ...job, ...(await api(`/jobs/${id}/${action}`, { method: "POST" })) };
      render();
      await loadJob();
      connect(); // a resumed job streams again
      if (!TERMINAL.has(job.status)) logs.load(true);
    } catch (err) {
      problem.replaceChildren(alert(`Could not ${action}: ${errorText(err)}`));
    }
  }

  function renderHead() {
    const actions = [];
    if (!TERMINAL.has(job.status)) {
      const busy = job.status === "cancelling";
      const attrs = { id: "cancel", disabled: busy, onclick: () => act("cancel") };
      actions.push(h("button.btn.danger", attrs, busy ? "Cancelling…" : "Cancel"));
    }
    if (job.status === "failed" || job.status === "cancelled") {
      const attrs = { id: "resume", onclick: () => act("resume") };
      actions.push(h("button.btn.primary", attrs, "Resume"));
    }
    if (TERMINAL.has(job.status)) {
      const remove = () =>
        confirmDelete(job).then(
          (gone) => gone && (location.hash = "#/"),
          (err) => problem.replaceChildren(alert(`Could not delete: ${errorText(err)}`)),
        );
      actions.push(h("button.btn.danger", { id: "delete", onclick: remove }, "Delete"));
    }
    const reuse = () => sessionStorage.setItem(DRAFT, pretty(job.spec));
    actions.push(h("a.btn", { href: "#/submit", onclick: reuse }, "Use as template"));
    if (job.status !== "queued") {
      // The same spec, started from this job's weights (its best checkpoint, else its newest).
      const fromWeights = { ...job.spec, init_from: { job: id } };
      const warm = () => sessionStorage.setItem(DRAFT, pretty(fromWeights));
      const attrs = { id: "warm-start", href: "#/submit", onclick: warm };
      actions.push(h("a.btn", attrs, "Use as template: start from this job's weights"));
    }
    head.replaceChildren(
      h(
        "div",
        {},
        h("h1", {}, badge(job.status), h("span.job-name", {}, job.name)),
        h("div.muted.mono.small", {}, job.id),
      ),
      h("div.actions", {}, actions),
    );
  }

  function renderSummary() {
    const text = h("span", {}, stepText(job, true));
    const bar = h("div.progress-line", {}, progressBar(job), text);
    const reason = `${job.pending_reason || "waiting"}`;
    const waiting =
      job.status === "queued" &&
      h("div.alert.info", {}, `Queue position ${job.queue_position ?? "–"}: ${reason}`);
    summary.replaceChildren(bar, waiting || "", h("div.tiles", {}, summaryTiles(job, names)));
    problem.replaceChildren(job.error && job.status !== "succeeded" ? alert(job.error) : "");
    renderTraceback();
  }

  // A failed job's traceback, from its log; drawn again only when it changes (so a reader's
  // closing it sticks).
  function renderTraceback() {
    const text = (job?.status === "failed" && tracebackText) || null;
    if (text === shownTraceback) return;
    shownTraceback = text;
    const title = h("summary", {}, "Traceback");
    const details = () => h("details.traceback", { open: true }, title, h("pre.log", {}, text));
    traceback.replaceChildren(text ? details() : "");
  }

  const sorted = () => [...points.values()].sort((a, b) => a.step - b.step);

  function render() {
    renderHead();
    renderSummary();
    events.replaceChildren(timeline(job.events));
    health.update(sorted(), job.health);
  }

  async function loadJob() {
    lastJob = Date.now();
    const fresh = await api(`/jobs/${id}`);
    if (!alive) return;
    job = fresh;
    render();
  }

  async function loadCheckpoints() {
    lastCheckpoints = Date.now();
    try {
      const list = await api(`/jobs/${id}/checkpoints`);
      if (!alive) return;
      checkpoints.replaceChildren(checkpointsTable(id, list));
      const newest = list.at(-1)?.name ?? null;
      if (newest !== newestCheckpoint) {
        newestCheckpoint = newest;
        graph.load(newest);
        if (!filtersCard.hidden) filters.load(newest);
      }
    } catch (err) {
      if (alive) checkpoints.replaceChildren(alert(errorText(err)));
    }
  }

  function addPoints(list) {
    for (const p of list) points.set(p.step, p);
    const all = sorted();
    curves?.update(all);
    if (job) health.update(all, job.health);
  }

  function connect() {
    if (live || TERMINAL.has(job.status)) return;
    live = stream(`/jobs/${id}/events`, {
      status(data) {
        job = { ...job, ...data, events: job.events };
        render();
        loadJob(); // the timeline is only in GET /jobs/{id}
        loadCheckpoints();
      },
      progress(data) {
        job = { ...job, status: data.status, progress: data.progress, metrics: data.metrics };
        renderSummary();
        if (Date.now() - lastCheckpoints > 5000) loadCheckpoints();
      },
      metrics(data) {
        addPoints(data.points);
        // The warnings are only in GET /jobs/{id}: re-read it after new health checks.
        if (data.points.some((p) => p.layers) && Date.now() - lastJob > 5000) loadJob();
      },
      end() {
        live.close();
        live = null;
        loadJob();
        loadCheckpoints();
      },
    });
  }

  async function start() {
    let metrics;
    try {
      [job, metrics] = await Promise.all([api(`/jobs/${id}`), allPoints(id)]);
    } catch (err) {
      if (!alive) return;
      const text = err.status === 404 ? `There is no job ${id}.` : errorText(err);
      root.replaceChildren(back(), empty("Job not found", text));
      return;
    }
    if (!alive) return;
    render();
    const classify = classifies(job);
    sideDiv.id = classify ? "acc-chart" : "grad-chart";
    if (!classify) sideTitle.textContent = "Gradient norm";
    curves = new Curves(lossDiv, sideDiv, { classify, lossName: job.spec.loss, healthDiv });
    spec.replaceChildren(h("pre.spec", {}, pretty(job.spec)));
    const picker = takesImages(job.spec) ? imagePicker(id, job.spec) : null;
    const layers = Array.isArray(job.spec.model.layers) ? job.spec.model.layers : []; // a count for an LM
    filtersCard.hidden = !layers.some((layer) => layer.type === "conv2d");
    if (job.spec.model.type === "transformer") {
      predictTitle.textContent = "Generate";
      predict.replaceChildren(generateBox(id, job.spec));
      explain.replaceChildren(tokenExplainBox(id, job.spec));
      explainer = attentionView(id, job.spec);
      attentionCard.hidden = false;
      attention.replaceChildren(explainer.element);
    } else {
      const box = picker ? imagePredictBox(id, job.spec, picker) : predictBox(id, job.spec);
      predict.replaceChildren(box);
      explainer = explainBox(id, job.spec, picker);
      explain.replaceChildren(explainer.element);
    }
    addPoints(metrics.points);
    loadCheckpoints();
    connect();
    logs.load(!TERMINAL.has(job.status));
    api("/cluster")
      .then((c) => {
        names = nodeNames(c);
        if (alive) renderSummary();
      })
      .catch(() => {}); // node addresses are a nicety
  }

  const stopTicker = ticker(() => {
    if (job && !TERMINAL.has(job.status)) {
      const el = summary.querySelector(".tick .v");
      if (el) el.textContent = duration(elapsed(job));
    }
  });

  start();
  return () => {
    alive = false;
    live?.close();
    logs.close();
    curves?.purge();
    explainer?.purge();
    stopTicker();
  };
}
