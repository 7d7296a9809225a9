// #/ — the jobs list: one page (cursor pagination), filtered by status, kept live by the
// all-jobs SSE stream. Rows are keyed by job id and updated in place.

import { api, stream } from "./api.js";
import { clusterStrip } from "./cluster.js";
import {
  alert,
  badge,
  duration,
  elapsed,
  empty,
  errorText,
  fullTime,
  h,
  num,
  pct,
  progressBar,
  STATUSES,
  stepText,
  ticker,
  when,
  workersText,
} from "./ui.js";

const LIMIT = 50;

const pageHash = (status, cursor, from, limit = LIMIT) => {
  const q = new URLSearchParams();
  if (status) q.set("status", status);
  if (limit !== LIMIT) q.set("limit", limit);
  if (cursor) q.set("cursor", cursor);
  if (from > 1) q.set("from", from);
  const s = q.toString();
  return s ? `#/?${s}` : "#/";
};

function cells(job, nodeNames) {
  const sub = [h("span.mono", { title: job.id }, job.id)];
  if (job.status === "queued" && job.pending_reason) sub.push(h("span", {}, job.pending_reason));
  if (job.error && job.status !== "succeeded") {
    const cls = job.status === "failed" ? "span.err-text" : "span";
    sub.push(h(cls, { title: job.error }, job.error));
  }
  const [workers, nodes] = workersText(job, nodeNames);
  const m = job.metrics || {};
  return [
    h(
      "div.c-name",
      {},
      h("div.name-line", {}, badge(job.status), h("span.job-name", {}, job.name)),
      h("div.sub", {}, ...sub),
    ),
    h("div.c-progress", {}, progressBar(job), h("div.sub", {}, stepText(job))),
    h("div.c-num", {}, h("span.k", {}, "train loss"), h("span.v", {}, num(m.train_loss))),
    h("div.c-num", {}, h("span.k", {}, "val acc"), h("span.v", {}, pct(m.val_accuracy))),
    h("div.c-workers", {}, h("div", {}, workers), h("div.sub", {}, nodes)),
    h(
      "div.c-time",
      {},
      h("div", { title: fullTime(job.created_at) }, when(job.created_at)),
      h("div.sub.tick", {}, duration(elapsed(job))),
    ),
  ];
}

export function jobsView(root, query) {
  const status = STATUSES.includes(query.get("status")) ? query.get("status") : null;
  const cursor = query.get("cursor");
  const from = Math.max(1, Number(query.get("from")) || 1);
  const limit = Math.min(500, Math.max(1, Number(query.get("limit")) || LIMIT));
  const rows = new Map(); // job id -> {job, el}
  let nodeNames = new Map();
  let alive = true;

  const list = h("div.job-list", { role: "list" });
  const pager = h("div.pager");
  const message = h("div");
  const filters = h(
    "div.filters",
    { role: "tablist" },
    [null, ...STATUSES].map((s) =>
      h(
        `a.chip${s === status ? ".active" : ""}${s ? `.s-${s}` : ""}`,
        { href: pageHash(s, null, 1, limit), role: "tab", "aria-selected": String(s === status) },
        s || "all",
      ),
    ),
  );
  const strip = clusterStrip((names) => {
    const changed = [...names].some(([id, name]) => nodeNames.get(id) !== name);
    nodeNames = names;
    if (changed) for (const { job } of rows.values()) put(job);
  });
  root.append(
    h(
      "div.page-head",
      {},
      h("h1", {}, "Jobs"),
      h("a.btn.primary", { href: "#/submit" }, "Submit a job"),
    ),
    strip.el,
    filters,
    message,
    h(
      "div.card.list-card",
      {},
      h(
        "div.job-head",
        { "aria-hidden": "true" },
        ...["Job", "Progress", "Train loss", "Val accuracy", "Workers", "Created · ran"].map((t) =>
          h("div", {}, t),
        ),
      ),
      list,
    ),
    pager,
  );

  function put(job) {
    let entry = rows.get(job.id);
    if (!entry) {
      entry = { el: h("a.job-row", { href: `#/jobs/${job.id}`, role: "listitem" }) };
      entry.el.dataset.id = job.id;
      rows.set(job.id, entry);
    }
    entry.job = job;
    entry.el.dataset.status = job.status;
    entry.el.replaceChildren(...cells(job, nodeNames));
    return entry;
  }

  function showEmpty() {
    if (rows.size) return;
    const text = status
      ? empty(`No ${status} jobs`, null, h("a.btn", { href: "#/" }, "Show all jobs"))
      : cursor
        ? empty("No older jobs", null, h("a.btn", { href: "#/" }, "Back to the newest"))
        : empty(
            "No jobs yet — submit one",
            "Pick an example spec, edit it, and watch it train here live.",
            h("a.btn.primary", { href: "#/submit" }, "Submit a job"),
          );
    list.replaceChildren(text);
  }

  async function load() {
    const q = new URLSearchParams({ limit });
    if (status) q.set("status", status);
    if (cursor) q.set("cursor", cursor);
    try {
      const page = await api(`/jobs?${q}`);
      if (!alive) return;
      message.replaceChildren();
      const keep = new Set(page.items.map((j) => j.id));
      for (const id of rows.keys()) if (!keep.has(id)) rows.delete(id);
      list.replaceChildren(...page.items.map((j) => put(j).el));
      showEmpty();
      renderPager(page);
    } catch (err) {
      if (alive) message.replaceChildren(alert(`Could not load the jobs: ${errorText(err)}`));
    }
  }

  function renderPager(page) {
    const to = from + page.items.length - 1;
    const older = page.next_cursor && pageHash(status, page.next_cursor, from + limit, limit);
    pager.replaceChildren(
      h("span.muted", {}, page.items.length ? `jobs ${from}–${to}` : ""),
      h(
        "span.pager-links",
        {},
        cursor && h("a.btn", { href: pageHash(status, null, 1, limit) }, "← Newest"),
        older && h("a.btn", { href: older }, "Older →"),
      ),
    );
  }

  // A job that is not listed belongs at the top only if it is newer than every listed one.
  const isNewest = (job) => {
    const first = list.querySelector(".job-row");
    const newest = first && rows.get(first.dataset.id).job.created_at;
    return !first || Date.parse(job.created_at) >= Date.parse(newest);
  };

  // Status changes move queue positions and filter membership: re-read the page, at most
  // every half second however many jobs change.
  let reloadTimer = null;
  const reloadSoon = () => {
    reloadTimer ??= setTimeout(() => {
      reloadTimer = null;
      if (alive) load();
    }, 500);
  };

  const live = stream(
    "/events",
    {
      status(job) {
        const entry = rows.get(job.id);
        if (entry) {
          const queued = job.status === "queued"; // the stream leaves positions out
          put({
            ...job,
            queue_position: queued ? entry.job.queue_position : null,
            pending_reason: queued ? entry.job.pending_reason : null,
          });
        } else if (!cursor && (!status || job.status === status) && isNewest(job)) {
          const { el } = put(job);
          list.querySelector(".empty")?.remove();
          list.prepend(el);
        }
        reloadSoon();
      },
      progress(data) {
        const entry = rows.get(data.job_id);
        if (!entry) return;
        const { status: s, progress, metrics } = data;
        put({ ...entry.job, status: s, progress, metrics });
      },
    },
    { onReopen: load },
  );

  const stopTicker = ticker(() => {
    for (const { job, el } of rows.values()) {
      if (job.status === "running" || job.status === "queued" || job.status === "cancelling") {
        const cell = el.querySelector(".tick");
        if (cell) cell.textContent = duration(elapsed(job));
      }
    }
  });

  load();
  return () => {
    alive = false;
    live.close();
    strip.stop();
    stopTicker();
    clearTimeout(reloadTimer);
  };
}
