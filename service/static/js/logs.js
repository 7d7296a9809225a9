// The job page's Logs card: the job's log (GET /jobs/{id}/logs), followed live while the job
// runs, with a search box and auto-scroll; and a failed job's traceback, from the same log.

import { api, stream } from "./api.js";
import { alert, errorText, h } from "./ui.js";

const MAX_LINES = 20_000; // the newest are kept: a long run's log stays responsive
const STAMPED = /^\d{4}-\d\d-\d\dT[\d:.]+Z /;

// The last traceback in `lines`: from its "Traceback" line to the end of its record.
export function lastTraceback(lines) {
  const start = lines.findLastIndex((l) => l.startsWith("Traceback (most recent call last)"));
  if (start < 0) return null;
  let end = start + 1;
  while (end < lines.length && !STAMPED.test(lines[end])) end += 1;
  return lines.slice(start, end).join("\n");
}

export function logsPanel(id, { onTraceback } = {}) {
  let lines = [];
  let live = null;
  const pre = h("pre.log", { id: "log-lines", tabindex: "0" });
  const search = h("input", { type: "search", id: "log-search", placeholder: "Search the log" });
  const follow = h("input", { type: "checkbox", id: "log-follow", checked: true });
  const count = h("span.small.muted", { id: "log-count" });
  const problem = h("div");

  function render() {
    const q = search.value.trim().toLowerCase();
    const shown = q ? lines.filter((l) => l.toLowerCase().includes(q)) : lines;
    pre.textContent = shown.join("\n");
    count.textContent = q
      ? `${shown.length} of ${lines.length} lines`
      : `${lines.length.toLocaleString()} lines`;
    if (follow.checked) pre.scrollTop = pre.scrollHeight;
    const tb = lastTraceback(lines);
    if (tb && onTraceback) onTraceback(tb);
  }

  function add(more) {
    lines = lines.concat(more);
    if (lines.length > MAX_LINES) lines = lines.slice(-MAX_LINES);
    render();
  }

  search.addEventListener("input", render);
  follow.addEventListener("change", render);
  // Scrolling up to read stops the auto-scroll; scrolling back to the end starts it again.
  pre.addEventListener("scroll", () => {
    const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 2;
    if (follow.checked !== atEnd) follow.checked = atEnd;
  });

  const element = h(
    "section.card.wide",
    { id: "logs" },
    h(
      "div.card-head",
      {},
      h("h2", {}, "Logs"),
      h("div.log-tools", {}, search, h("label.small.muted", {}, follow, " auto-scroll"), count),
    ),
    problem,
    pre,
  );

  return {
    element,
    // The whole log once (a finished job), or followed until the job ends.
    async load(running) {
      if (!running) {
        try {
          const text = await api(`/jobs/${id}/logs`);
          lines = [];
          add(text ? text.replace(/\n$/, "").split("\n") : []);
        } catch (err) {
          problem.replaceChildren(alert(`Could not read the log: ${errorText(err)}`));
        }
        return;
      }
      if (live) return;
      lines = [];
      live = stream(`/jobs/${id}/logs?follow=true`, {
        log: (data) => add(data.lines),
        end: () => {
          live?.close();
          live = null;
        },
      });
    },
    close() {
      live?.close();
      live = null;
    },
  };
}
