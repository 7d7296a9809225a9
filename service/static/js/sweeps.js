// #/sweeps — the sweeps, newest first; #/sweeps/<id> — one sweep: its best trial (linked to
// its job), a trials table sortable by any column, a scatter plot of each parameter against
// the metric, and the trials' learning curves overlaid, pruned ones marked. Kept live by the
// sweep's event stream. Curves come from GET /compare, ten trials a request.

import { api, stream } from "./api.js";
import { drawRuns, drawScatter, runColor } from "./charts.js";
import { shown } from "./compare.js";
import { alert, badge, empty, errorText, fullTime, h, num, TERMINAL, table, when } from "./ui.js";

const COMPARE_MOST = 10; // ids per GET /compare
const CURVE_POINTS = 300;
const COMPARE_TOP = 5; // trials the "Compare the best" link opens
const CURVES_EVERY_MS = 3000; // while trials run, their curves are re-read at most this often
const METRIC_NAMES = {
  val_loss: "val loss",
  val_accuracy: "val accuracy",
  val_exact_match: "val exact match",
};

const stateBadge = (trial) => (trial.pruned ? badge("pruned") : badge(trial.state));
const countsText = (counts) =>
  Object.entries(counts)
    .filter(([, n]) => n)
    .map(([state, n]) => `${n} ${state}`)
    .join(" · ") || "no trials yet";
const metricName = (m) => METRIC_NAMES[m] || m;
// The number a trial is ranked by: its result, else the best it reported so far.
const score = (t) => t.value ?? t.best_value ?? null;

export function sweepsView(root) {
  const list = h("div");
  root.append(h("div.page-head", {}, h("h1", {}, "Sweeps")), list);
  let alive = true;
  let timer = null;
  async function load() {
    try {
      const page = await api("/sweeps?limit=100");
      if (!alive) return;
      if (!page.items.length) {
        list.replaceChildren(
          empty("No sweeps yet", "Start one with `shardgrad sweep SWEEP.json` or POST /sweeps."),
        );
      } else {
        const head = ["Sweep", "Status", "Trials", "Metric", "Best", "Created"];
        const rows = page.items.map((s) =>
          h(
            "tr",
            { "data-id": s.id },
            h("td", {}, h("a", { href: `#/sweeps/${s.id}` }, s.name)),
            h("td", {}, badge(s.status)),
            h("td", {}, countsText(s.counts)),
            h("td", {}, `${metricName(s.metric)} (${s.mode})`),
            h("td.num", {}, num(s.best ? score(s.best) : null)),
            h("td", { title: fullTime(s.created_at) }, when(s.created_at)),
          ),
        );
        list.replaceChildren(
          h("section.card.list-card", {}, table(head, rows, { numeric: ["Best"], id: "sweeps" })),
        );
      }
      if (page.items.some((s) => !TERMINAL_SWEEP.has(s.status))) timer = setTimeout(load, 5000);
    } catch (err) {
      if (alive) list.replaceChildren(alert(`Could not load the sweeps: ${errorText(err)}`));
    }
  }
  load();
  return () => {
    alive = false;
    clearTimeout(timer);
  };
}

const TERMINAL_SWEEP = new Set(["finished", "cancelled"]);

const jobLink = (id) => (id ? h("a", { href: `#/jobs/${id}` }, "open") : "–");

// The trials table's columns: [head, value of a trial, how it is shown, numeric].
function columns(sweep) {
  const params = Object.keys(sweep.spec.parameters);
  const metric = metricName(sweep.metric);
  return [
    ["#", (t) => t.number, String, true],
    ["State", (t) => (t.pruned ? "pruned" : t.state), (_, t) => stateBadge(t), false],
    ...params.map((p) => [p, (t) => t.params[p], shown, false]),
    [metric, (t) => t.value, (v) => num(v), true],
    [`best ${metric}`, (t) => t.best_value, (v) => num(v), true],
    ["best step", (t) => t.best_step, shown, true],
    ["Job", (t) => t.job_id, jobLink, false],
  ];
}

// Trials in the order of column `by` (its head; descending if `desc`), those without a
// value last either way.
function sorted(trials, cols, by, desc) {
  const col = cols.find((c) => c[0] === by) || cols[0];
  const key = (t) => {
    const v = col[1](t);
    return typeof v === "object" && v !== null ? JSON.stringify(v) : v;
  };
  const cmp = (a, b) => {
    const [x, y] = [key(a), key(b)];
    if (x === y) return a.number - b.number;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (desc ? -1 : 1);
  };
  return [...trials].sort(cmp);
}

// The trials' series of `metric`, by job id: GET /compare, a request per ten jobs (each
// request needs two ids or more: a lone last one rides along with the previous group).
async function readCurves(ids, metric) {
  const groups = [];
  for (let i = 0; i < ids.length; i += COMPARE_MOST) groups.push(ids.slice(i, i + COMPARE_MOST));
  const last = groups.at(-1);
  if (last?.length === 1) {
    if (groups.length > 1) last.unshift(groups.at(-2).pop());
    else return readOne(ids[0], metric);
  }
  const out = new Map();
  for (const group of groups) {
    const q = `ids=${encodeURIComponent(group.join(","))}&points=${CURVE_POINTS}`;
    const cmp = await api(`/compare?${q}`);
    for (const j of cmp.jobs) out.set(j.id, j.series[metric] || { steps: [], values: [] });
  }
  return out;
}

async function readOne(id, metric) {
  const page = await api(`/jobs/${id}/metrics?limit=${CURVE_POINTS * 10}`);
  const points = page.points.filter((p) => p[metric] !== null && p[metric] !== undefined);
  const series = { steps: points.map((p) => p.step), values: points.map((p) => p[metric]) };
  return new Map([[id, series]]);
}

export function sweepView(root, id) {
  const head = h("div.job-title");
  const summary = h("div");
  const problem = h("div");
  const bestCard = h("section.card.wide", { id: "best-trial" });
  const curvesDiv = h("div.chart", { id: "sweep-curves" });
  const scatters = h("div.scatter-grid", { id: "sweep-scatters" });
  const trialsWrap = h("div");
  const compareTop = h("a.btn", { id: "compare-top", hidden: true });
  root.append(
    h("a.back", { href: "#/sweeps" }, "← All sweeps"),
    head,
    summary,
    problem,
    bestCard,
    h("section.card.wide", {}, h("h2", {}, "Learning curves"), curvesDiv),
    h("section.card.wide", {}, h("h2", {}, "Parameters against the metric"), scatters),
    h(
      "section.card.wide",
      {},
      h("div.card-head", {}, h("h2", {}, "Trials"), compareTop),
      trialsWrap,
    ),
  );

  let sweep = null;
  let alive = true;
  let sortBy = null;
  let desc = false;
  const curves = new Map(); // job id -> series, once read; re-read while the trial runs
  const done = new Set(); // job ids whose series is final
  let curvesTimer = null;
  let curvesBusy = false;

  function render() {
    const cancel = h("button.btn", { type: "button", id: "sweep-cancel" }, "Cancel sweep");
    cancel.addEventListener("click", async () => {
      try {
        show(await api(`/sweeps/${id}/cancel`, { method: "POST" }));
      } catch (err) {
        problem.replaceChildren(alert(`Could not cancel: ${errorText(err)}`));
      }
    });
    head.replaceChildren(h("h1", {}, sweep.name, " ", badge(sweep.status)));
    if (sweep.status === "running") head.append(cancel);
    const spec = sweep.spec;
    summary.replaceChildren(
      h(
        "p.muted",
        { id: "sweep-summary" },
        `${countsText(sweep.counts)} of ${spec.trials} trials · ${spec.parallel} at once · `,
        `${metricName(sweep.metric)}, ${sweep.mode === "min" ? "lowest" : "highest"} best · `,
        `sampler ${spec.sampler.type} · pruner ${spec.pruner.type}`,
      ),
    );
    if (sweep.error) summary.append(alert(sweep.error));
    renderBest();
    renderTrials();
    renderScatters();
  }

  function renderBest() {
    const b = sweep.best;
    if (!b) {
      bestCard.replaceChildren(h("h2", {}, "Best trial"), h("p.muted", {}, "None finished yet."));
      return;
    }
    const params = Object.entries(b.params).map(([k, v]) => h("li", {}, `${k} = ${shown(v)}`));
    bestCard.replaceChildren(
      h("h2", {}, `Best trial: #${b.number}`),
      h(
        "p",
        {},
        `${metricName(sweep.metric)} ${num(score(b))}`,
        b.best_step !== null ? ` at step ${b.best_step} · ` : " · ",
        b.job_id ? h("a", { href: `#/jobs/${b.job_id}`, id: "best-job" }, "open its job") : null,
      ),
      h("ul.plain", {}, params),
    );
  }

  // The best few trials (by result, else best value so far) on the compare page.
  function renderCompareLink() {
    const sign = sweep.mode === "min" ? 1 : -1;
    const top = sweep.trials
      .filter((t) => t.job_id && score(t) !== null)
      .sort((a, b) => sign * (score(a) - score(b)))
      .slice(0, COMPARE_TOP);
    compareTop.hidden = top.length < 2;
    compareTop.textContent = `Compare the best ${top.length}`;
    compareTop.href = `#/compare?ids=${top.map((t) => t.job_id).join(",")}`;
  }

  function renderTrials() {
    renderCompareLink();
    const cols = columns(sweep);
    if (sortBy === null) [sortBy, desc] = [cols.at(-4)[0], sweep.mode === "max"];
    const th = (c) => {
      const on = c[0] === sortBy;
      const arrow = on ? (desc ? " ↓" : " ↑") : "";
      const button = h("button.sort-head", { type: "button", "data-sort": c[0] }, c[0] + arrow);
      button.addEventListener("click", () => {
        desc = on ? !desc : false;
        sortBy = c[0];
        renderTrials();
      });
      const sort = on ? (desc ? "descending" : "ascending") : null;
      return h(c[3] ? "th.num" : "th", { "aria-sort": sort }, button);
    };
    const best = sweep.best?.number;
    const rows = sorted(sweep.trials, cols, sortBy, desc).map((t) =>
      h(
        `tr${t.number === best ? ".best-row" : ""}`,
        { "data-number": t.number, "data-state": t.pruned ? "pruned" : t.state },
        cols.map((c) => h(c[3] ? "td.num" : "td", {}, c[2](c[1](t), t))),
      ),
    );
    if (!rows.length) {
      trialsWrap.replaceChildren(empty("No trials yet"));
      return;
    }
    trialsWrap.replaceChildren(
      h(
        "div.table-wrap",
        {},
        h(
          "table",
          { id: "trials" },
          h("thead", {}, h("tr", {}, cols.map(th))),
          h("tbody", {}, rows),
        ),
      ),
    );
  }

  function renderScatters() {
    const scored = sweep.trials.filter((t) => score(t) !== null);
    const params = Object.entries(sweep.spec.parameters);
    const divs = params.map(([p]) => {
      const existing = scatters.querySelector(`[data-param="${CSS.escape(p)}"] .chart-auto`);
      return existing || h("div.chart-auto");
    });
    scatters.replaceChildren(
      ...params.map(([p], i) => h("div.param-plot", { "data-param": p }, h("h3", {}, p), divs[i])),
    );
    params.forEach(([p, dist], i) => {
      const points = scored.map((t) => {
        const v = t.params[p];
        return {
          x: typeof v === "number" ? v : JSON.stringify(v),
          y: score(t),
          label: `#${t.number}${t.pruned ? " (pruned)" : ""}`,
          color: runColor(t.number),
          marked: t.pruned,
        };
      });
      const log = dist.type === "log_uniform" || (dist.type === "int" && dist.log);
      drawScatter(divs[i], points, { xTitle: p, yTitle: metricName(sweep.metric), log });
    });
  }

  // Read the curves of trials not read yet or still running, then redraw them all.
  async function refreshCurves() {
    clearTimeout(curvesTimer);
    curvesTimer = null;
    if (curvesBusy || !alive) return;
    curvesBusy = true;
    try {
      const trials = sweep.trials.filter((t) => t.job_id);
      const stale = trials.filter((t) => !done.has(t.job_id)).map((t) => t.job_id);
      // Ended before the read (not after: an event may come while it waits): final curves.
      const ended = trials.filter((t) => TERMINAL.has(t.state)).map((t) => t.job_id);
      if (stale.length) {
        for (const [jobId, series] of await readCurves(stale, sweep.metric)) {
          curves.set(jobId, series);
        }
        for (const jobId of ended) done.add(jobId);
      }
      if (!alive) return;
      const runs = trials.map((t) => ({
        name: `#${t.number}`,
        color: runColor(t.number),
        marked: t.pruned,
        series: { [sweep.metric]: curves.get(t.job_id) },
      }));
      const metric = [[sweep.metric, metricName(sweep.metric), "solid"]];
      const accuracy = sweep.metric !== "val_loss";
      const yaxis = accuracy ? { tickformat: ".0%" } : {};
      const legend = runs.length <= 12;
      await drawRuns(curvesDiv, runs, metric, { yTitle: metricName(sweep.metric), yaxis, legend });
    } catch (err) {
      if (alive) problem.replaceChildren(alert(`Could not read the curves: ${errorText(err)}`));
    } finally {
      curvesBusy = false;
    }
  }

  const curvesSoon = () => {
    if (!curvesTimer) curvesTimer = setTimeout(refreshCurves, CURVES_EVERY_MS);
  };

  function show(next) {
    sweep = next;
    render();
    if (curves.size === 0) refreshCurves();
    else curvesSoon();
  }

  let live = null;
  (async () => {
    try {
      show(await api(`/sweeps/${id}`));
    } catch (err) {
      if (!alive) return;
      if (err.status === 404) {
        root.replaceChildren(empty("No such sweep", `There is no sweep ${id}.`));
      } else {
        problem.replaceChildren(alert(`Could not load the sweep: ${errorText(err)}`));
      }
      return;
    }
    if (!alive || TERMINAL_SWEEP.has(sweep.status)) return;
    live = stream(
      `/sweeps/${id}/events`,
      {
        sweep: (data) => alive && show(data),
        end: () => {
          live?.close();
          live = null;
          api(`/sweeps/${id}`).then((s) => alive && show(s));
        },
      },
      { onReopen: () => api(`/sweeps/${id}`).then((s) => alive && show(s)) },
    );
  })();

  return () => {
    alive = false;
    live?.close();
    clearTimeout(curvesTimer);
    if (window.Plotly) {
      for (const div of [curvesDiv, ...scatters.querySelectorAll(".chart-auto")]) {
        window.Plotly.purge(div);
      }
    }
  };
}
