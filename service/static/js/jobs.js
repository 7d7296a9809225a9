// #/ — the jobs list: one page (cursor pagination), filtered by status, tags and name,
// sorted by a column, kept live by the all-jobs SSE stream. Rows are keyed by job id and
// updated in place. The filters live in the URL (#/?status=&tag=k:v&name=&sort=), so a
// filtered list is a link. Also the delete action with its confirmation (used by job.js).

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
const DEFAULT_SORT = "-created";
// The API's sorts (GET /jobs?sort=), as the sort menu names them.
const SORTS = [
  ["-created", "newest first"],
  ["created", "oldest first"],
  ["val_loss", "val loss, lowest first"],
  ["-val_accuracy", "val accuracy, highest first"],
  ["train_loss", "train loss, lowest first"],
  ["-duration", "longest run first"],
  ["duration", "shortest run first"],
  ["-priority", "priority, highest first"],
  ["name", "name, A to Z"],
  ["-name", "name, Z to A"],
];
// Sortable column heads: a click sorts by the column, a second click reverses it.
const HEADS = [
  ["Job", "name"],
  ["Progress", null],
  ["Train loss", "train_loss"],
  ["Val accuracy", "-val_accuracy"],
  ["Workers", null],
  ["Created · ran", "-created"],
];
const flip = (sort) => (sort.startsWith("-") ? sort.slice(1) : `-${sort}`);

// The list's URL: the filters, and the page (cursor, from) within them.
const pageHash = (f, cursor, from) => {
  const q = new URLSearchParams();
  if (f.status) q.set("status", f.status);
  for (const t of f.tags) q.append("tag", t);
  if (f.name) q.set("name", f.name);
  if (f.sort !== DEFAULT_SORT) q.set("sort", f.sort);
  if (f.limit !== LIMIT) q.set("limit", f.limit);
  if (cursor) q.set("cursor", cursor);
  if (from > 1) q.set("from", from);
  const s = q.toString();
  return s ? `#/?${s}` : "#/";
};

// The jobs ticked for comparison, kept for this tab across pages and filters.
const PICKED = "shardgrad.compare";
const MAX_COMPARE = 10; // GET /compare's most
const picked = new Set(readPicked());
function readPicked() {
  try {
    const ids = JSON.parse(sessionStorage.getItem(PICKED) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return []; // not ours, or damaged: start with none ticked
  }
}
const savePicked = () => sessionStorage.setItem(PICKED, JSON.stringify([...picked]));

const isDefault = (f) => !f.status && !f.tags.length && !f.name && f.sort === DEFAULT_SORT;

// Ask, then DELETE /jobs/{id}; true once deleted. A <dialog> like the token prompt.
export function confirmDelete(job) {
  return new Promise((resolve, reject) => {
    const dialog = h(
      "dialog.dialog",
      { id: "delete-dialog" },
      h(
        "form",
        { method: "dialog" },
        h("h2", {}, `Delete ${job.name}?`),
        h("p", {}, "Its checkpoints, logs and metrics go too. This cannot be undone."),
        h(
          "div.dialog-actions",
          {},
          h("button.btn", { value: "keep", id: "delete-keep" }, "Keep"),
          h("button.btn.danger", { value: "delete", id: "delete-confirm" }, "Delete"),
        ),
      ),
    );
    dialog.addEventListener("close", async () => {
      dialog.remove();
      if (dialog.returnValue !== "delete") return resolve(false);
      try {
        await api(`/jobs/${job.id}`, { method: "DELETE" });
        resolve(true);
      } catch (err) {
        reject(err);
      }
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

function cells(job, nodeNames) {
  const sub = [h("span.mono", { title: job.id }, job.id)];
  if (job.status === "queued" && job.pending_reason) sub.push(h("span", {}, job.pending_reason));
  if (job.error && job.status !== "succeeded") {
    const cls = job.status === "failed" ? "span.err-text" : "span";
    sub.push(h(cls, { title: job.error }, job.error));
  }
  const [workers, nodes] = workersText(job, nodeNames);
  const m = job.metrics || {};
  const tags = Object.entries(job.tags || {}).map(([k, v]) => h("span.tag", {}, `${k}:${v}`));
  return [
    h(
      "div.c-name",
      {},
      h(
        "div.name-line",
        {},
        h("input.pick", {
          type: "checkbox",
          checked: picked.has(job.id),
          "aria-label": `compare ${job.name}`,
          dataset: { id: job.id },
        }),
        badge(job.status),
        h("span.job-name", {}, job.name),
        ...tags,
      ),
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

function searchForm(f) {
  const name = h("input", {
    type: "search",
    id: "name-filter",
    placeholder: "name contains…",
    value: f.name || "",
  });
  const tag = h("input", { type: "search", id: "tag-filter", placeholder: "tag key:value" });
  const sort = h(
    "select",
    { id: "sort", "aria-label": "sort" },
    (SORTS.some(([v]) => v === f.sort) ? SORTS : [...SORTS, [f.sort, f.sort]]).map(
      ([value, text]) => h("option", { value, selected: value === f.sort }, text),
    ),
  );
  const go = (changes) => {
    location.hash = pageHash({ ...f, ...changes }, null, 1);
  };
  sort.addEventListener("change", () => go({ sort: sort.value }));
  const form = h(
    "form.search",
    {
      onsubmit: (e) => {
        e.preventDefault();
        const t = tag.value.trim();
        go({ name: name.value.trim(), tags: t ? [...f.tags, t] : f.tags });
      },
    },
    name,
    tag,
    sort,
    h("button.btn", { type: "submit" }, "Search"),
    ...f.tags.map((t) =>
      h(
        "a.chip.tag-chip",
        {
          href: pageHash({ ...f, tags: f.tags.filter((x) => x !== t) }, null, 1),
          title: "remove this filter",
        },
        `${t} ×`,
      ),
    ),
  );
  return form;
}

// "3 selected · Compare · Clear", shown while jobs are ticked.
function pickedBar() {
  const count = h("span", { id: "picked-count" });
  const go = h("a.btn.primary", { id: "compare" }, "Compare");
  const clear = h("button.btn", { type: "button", id: "picked-clear" }, "Clear");
  const el = h("div.compare-bar", { hidden: true }, count, go, clear);
  clear.addEventListener("click", () => {
    picked.clear();
    savePicked();
    for (const box of document.querySelectorAll("input.pick")) box.checked = false;
    render();
  });
  function render() {
    const n = picked.size;
    el.hidden = n === 0;
    const ok = n >= 2 && n <= MAX_COMPARE;
    const why = n < 2 ? ": tick another to compare" : ok ? "" : `: at most ${MAX_COMPARE}`;
    count.textContent = `${n} selected${why}`;
    go.classList.toggle("disabled", !ok);
    go.setAttribute("aria-disabled", String(!ok));
    if (ok) go.setAttribute("href", `#/compare?ids=${[...picked].join(",")}`);
    else go.removeAttribute("href");
  }
  render();
  return { el, render };
}

export function jobsView(root, query) {
  const status = STATUSES.includes(query.get("status")) ? query.get("status") : null;
  const cursor = query.get("cursor");
  const from = Math.max(1, Number(query.get("from")) || 1);
  const limit = Math.min(500, Math.max(1, Number(query.get("limit")) || LIMIT));
  const asked = query.get("sort");
  const known = SORTS.some(([s]) => s === asked) || HEADS.some(([, s]) => s && flip(s) === asked);
  const sort = known ? asked : DEFAULT_SORT;
  const f = { status, tags: query.getAll("tag"), name: query.get("name"), sort, limit };
  const rows = new Map(); // job id -> {job, el}
  let nodeNames = new Map();
  let alive = true;

  const list = h("div.job-list", { role: "list" });
  const compareBar = pickedBar();
  // A checkbox's click ticks it (the row's link is not followed: the box is the target).
  list.addEventListener("change", (e) => {
    if (!e.target.matches("input.pick")) return;
    if (e.target.checked) picked.add(e.target.dataset.id);
    else picked.delete(e.target.dataset.id);
    savePicked();
    compareBar.render();
  });
  const pager = h("div.pager");
  const message = h("div");
  const filters = h(
    "div.filters",
    { role: "tablist" },
    [null, ...STATUSES].map((s) =>
      h(
        `a.chip${s === status ? ".active" : ""}${s ? `.s-${s}` : ""}`,
        {
          href: pageHash({ ...f, status: s }, null, 1),
          role: "tab",
          "aria-selected": String(s === status),
        },
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
    searchForm(f),
    compareBar.el,
    message,
    h("div.card.list-card", {}, h("div.job-head", {}, ...HEADS.map(head)), list),
    pager,
  );

  function head([text, by]) {
    if (!by) return h("div", {}, text);
    const on = sort === by || sort === flip(by);
    const next = sort === by ? flip(by) : by;
    const arrow = on ? (sort.startsWith("-") ? " ↓" : " ↑") : "";
    const attrs = { href: pageHash({ ...f, sort: next }, null, 1), "data-sort": by };
    return h("div", {}, h(`a.sort${on ? ".active" : ""}`, attrs, text + arrow));
  }

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
    const text = f.tags.length || f.name
      ? empty("No jobs match", null, h("a.btn", { href: "#/" }, "Show all jobs"))
      : status
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
    const q = new URLSearchParams(pageHash(f, cursor, 1).slice(3));
    q.set("limit", limit);
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
    const older = page.next_cursor && pageHash(f, page.next_cursor, from + limit);
    const byAge = sort === DEFAULT_SORT;
    pager.replaceChildren(
      h("span.muted", {}, page.items.length ? `jobs ${from}–${to}` : ""),
      h(
        "span.pager-links",
        {},
        cursor && h("a.btn", { href: pageHash(f, null, 1) }, byAge ? "← Newest" : "← First"),
        older && h("a.btn", { href: older }, byAge ? "Older →" : "Next →"),
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

  // Only the unfiltered newest-first list shows a new job at once; others re-read the page.
  const newestFirst = !cursor && isDefault({ ...f, status: null });
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
        } else if (newestFirst && (!status || job.status === status) && isNewest(job)) {
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
