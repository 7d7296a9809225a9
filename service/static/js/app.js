// The single-page app: hash routes to views. A view renders into <main> and returns a
// function that stops its streams and timers when the reader navigates away.

import { clusterView } from "./cluster.js";
import { compareView } from "./compare.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { submitView } from "./submit.js";
import { sweepsView, sweepView } from "./sweeps.js";
import { empty, h } from "./ui.js";

const query = (text) => new URLSearchParams(text || "");

const ROUTES = [
  [/^#?\/?(?:\?(.*))?$/, "jobs", (root, m) => jobsView(root, query(m[1]))],
  [/^#\/jobs\/([\w-]+)$/, "jobs", (root, m) => jobView(root, m[1])],
  [/^#\/compare(?:\?(.*))?$/, "jobs", (root, m) => compareView(root, query(m[1]))],
  [/^#\/sweeps$/, "sweeps", (root) => sweepsView(root)],
  [/^#\/sweeps\/([\w-]+)$/, "sweeps", (root, m) => sweepView(root, m[1])],
  [/^#\/submit$/, "submit", (root) => submitView(root)],
  [/^#\/cluster$/, "cluster", (root) => clusterView(root)],
];

const main = document.getElementById("main");
let leave = null;

function route() {
  leave?.();
  leave = null;
  main.replaceChildren();
  window.scrollTo(0, 0);
  const hash = location.hash || "#/";
  for (const [pattern, nav, view] of ROUTES) {
    const m = hash.match(pattern);
    if (!m) continue;
    for (const a of document.querySelectorAll("[data-nav]")) {
      a.classList.toggle("active", a.dataset.nav === nav);
    }
    leave = view(main, m) || null;
    return;
  }
  const home = h("a.btn", { href: "#/" }, "Go to the jobs");
  main.append(empty("Page not found", `Nothing at ${hash}.`, home));
}

const live = document.getElementById("live");
const LIVE_TEXT = { open: "live", retry: "reconnecting…", off: "" };
window.addEventListener("live", (e) => {
  live.dataset.state = e.detail;
  live.textContent = LIVE_TEXT[e.detail];
});

window.addEventListener("hashchange", route);
route();
