// #/cluster — Ray's nodes and CPUs, the running jobs and their workers (GET /cluster, polled:
// the cluster has no stream). clusterStrip is the one-line summary on the jobs list.

import { api } from "./api.js";
import { alert, badge, empty, errorText, h, shortId, table, tile, workerCount } from "./ui.js";

const cpus = (x) => Number(x.toFixed(2)).toString();

function poll(fn, ms) {
  let timer = null;
  let alive = true;
  const run = async () => {
    await fn();
    if (alive) timer = setTimeout(run, ms);
  };
  run();
  return () => {
    alive = false;
    clearTimeout(timer);
  };
}

export const nodeNames = (c) => new Map(c.nodes.map((n) => [n.id, n.address || shortId(n.id)]));

function cpuBar(c) {
  const used = c.cpus_total - c.cpus_free;
  const fraction = c.cpus_total ? used / c.cpus_total : 0;
  return h(
    "div.bar.s-running",
    { title: `${cpus(used)} of ${cpus(c.cpus_total)} CPUs in use` },
    h("div.bar-fill", { style: { width: `${(100 * fraction).toFixed(1)}%` } }),
  );
}

export function clusterStrip(onNodes) {
  const label = h("span.strip-label", {}, "Cluster");
  const el = h("a.cluster-strip", { href: "#/cluster" }, label, h("span.muted", {}, "…"));
  const stop = poll(async () => {
    try {
      const c = await api("/cluster");
      onNodes(nodeNames(c));
      const alive = c.nodes.filter((n) => n.alive).length;
      const used = c.cpus_total - c.cpus_free;
      const parts = [
        `${alive} node${alive === 1 ? "" : "s"}`,
        `${cpus(used)} of ${cpus(c.cpus_total)} CPUs in use`,
        `${c.running_jobs.length} running`,
      ];
      if (c.paused) parts.push("dispatcher paused");
      const text = h("span", {}, parts.join(" · "));
      el.replaceChildren(label, h("span.strip-bar", {}, cpuBar(c)), text);
    } catch {
      el.replaceChildren(label, h("span.muted", {}, "unavailable"));
    }
  }, 5000);
  return { el, stop };
}

function nodesTable(c) {
  const workersOn = new Map();
  for (const job of c.running_jobs) {
    for (const id of job.worker_nodes) workersOn.set(id, (workersOn.get(id) || 0) + 1);
  }
  const state = (n) => (n.alive ? h("span.badge.s-succeeded", {}, "alive") : badge("failed"));
  const rows = c.nodes.map((n) =>
    h(
      "tr",
      {},
      h("td.mono", { title: n.id }, shortId(n.id)),
      h("td", {}, n.address || "–"),
      h("td.num", {}, cpus(n.cpus)),
      h("td.num", {}, String(workersOn.get(n.id) || 0)),
      h("td", {}, state(n)),
    ),
  );
  const head = ["Node", "Address", "CPUs", "Workers", "State"];
  return table(head, rows, { numeric: ["CPUs", "Workers"] });
}

function runningTable(c) {
  if (!c.running_jobs.length) {
    return empty("Nothing running", "Queued jobs start when their workers' CPUs are free.");
  }
  const names = nodeNames(c);
  const rows = c.running_jobs.map((j) => {
    const nodes = [...new Set(j.worker_nodes)].map((id) => names.get(id) || shortId(id));
    return h(
      "tr",
      {},
      h(
        "td",
        {},
        h("a", { href: `#/jobs/${j.job_id}` }, j.name),
        " ",
        h("span.mono.muted", {}, j.job_id),
      ),
      h("td.num", {}, j.workers === null ? "choosing" : workerCount(j.workers)),
      h("td.num", {}, cpus(j.cpus)),
      h("td", {}, nodes.join(", ") || "–"),
    );
  });
  return table(["Job", "Workers", "CPUs", "Nodes"], rows, { numeric: ["Workers", "CPUs"] });
}

function render(c) {
  const alive = c.nodes.filter((n) => n.alive).length;
  const used = c.cpus_total - c.cpus_free;
  const flags = [c.paused ? "paused" : "dispatching", c.autoscaling && "autoscaling"];
  return [
    h(
      "div.tiles",
      {},
      tile("Nodes", `${alive}`, alive === c.nodes.length ? "all alive" : `${c.nodes.length} known`),
      tile("CPUs in use", `${cpus(used)} / ${cpus(c.cpus_total)}`, cpuBar(c)),
      tile("CPUs free", cpus(c.cpus_free)),
      tile(
        "Running jobs",
        `${c.running_jobs.length} / ${c.max_concurrent_jobs}`,
        flags.filter(Boolean).join(" · "),
      ),
    ),
    h("section.card", {}, h("h2", {}, "Nodes"), nodesTable(c)),
    h("section.card", {}, h("h2", {}, "Running jobs"), runningTable(c)),
  ];
}

function rayDashboard(url) {
  if (url) return h("a.btn", { href: url, target: "_blank", rel: "noopener" }, "Ray dashboard ↗");
  const hint = "start the service with SHARDGRAD_RAY_DASHBOARD=true";
  return h("span.muted.small", { title: hint }, "Ray dashboard off");
}

export function clusterView(root) {
  const body = h("div.stack");
  const link = h("span");
  root.append(h("div.page-head", {}, h("h1", {}, "Cluster"), link), body);
  return poll(async () => {
    try {
      const c = await api("/cluster");
      link.replaceChildren(rayDashboard(c.dashboard_url));
      body.replaceChildren(...render(c));
    } catch (err) {
      body.replaceChildren(alert(`Could not read the cluster: ${errorText(err)}`));
    }
  }, 2000);
}
