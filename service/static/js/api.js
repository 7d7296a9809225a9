// The HTTP API and its live streams. When the service has an API token, the first 401 asks
// for it once; it is kept in sessionStorage (this tab only) and sent as a Bearer header, or
// as ?token= to the SSE routes, since EventSource cannot set headers.

const API = "/api/v1";
const TOKEN_KEY = "shardgrad.token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `the server answered ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

const token = () => sessionStorage.getItem(TOKEN_KEY);

// Streams wait for the first answered request: by then the token, if one is needed, is known.
let authorized;
const ready = new Promise((resolve) => {
  authorized = resolve;
});

let asking = null; // one prompt, however many requests were refused at once

function askForToken(rejected) {
  asking ??= new Promise((resolve) => {
    const dialog = document.getElementById("token-dialog");
    const input = document.getElementById("token-input");
    document.getElementById("token-error").hidden = !rejected;
    input.value = "";
    dialog.oncancel = (e) => e.preventDefault(); // Escape: nothing works without a token
    dialog.querySelector("form").addEventListener(
      "submit",
      () => {
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        asking = null;
        resolve();
      },
      { once: true },
    );
    dialog.showModal();
  });
  return asking;
}

export async function api(path, { method = "GET", body } = {}) {
  for (;;) {
    const sent = token();
    const headers = {};
    if (sent) headers.Authorization = `Bearer ${sent}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const init = { method, headers };
    if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
    const r = await fetch(API + path, init);
    if (r.status === 401) {
      if (token() === sent) await askForToken(Boolean(sent)); // else another request got one
      continue;
    }
    authorized();
    const json = (r.headers.get("content-type") || "").includes("json");
    const data = json ? await r.json() : await r.text();
    if (!r.ok) throw new ApiError(r.status, json ? data.detail : data || r.statusText);
    return data;
  }
}

const save = (href, filename) =>
  Object.assign(document.createElement("a"), { href, download: filename }).click();

// A file download that carries the token (a plain link cannot send the header). Without a
// token the browser fetches it itself, as a download even when the server sends plain text.
export async function download(path, filename) {
  const t = token();
  if (!t) {
    save(API + path, filename);
    return;
  }
  const r = await fetch(API + path, { headers: { Authorization: `Bearer ${t}` } });
  if (!r.ok) throw new ApiError(r.status, r.statusText);
  const url = URL.createObjectURL(await r.blob());
  save(url, filename);
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export const apiUrl = (path) => API + path;

// Open SSE streams, so the header can show whether the page is live.
const streams = new Map();

function announce() {
  const states = [...streams.values()];
  const state = !states.length ? "off" : states.every((s) => s === "open") ? "open" : "retry";
  window.dispatchEvent(new CustomEvent("live", { detail: state }));
}

// Subscribes `handlers` ({event: fn(data)}) to an SSE route. `onReopen` runs when the stream
// comes back after a drop: the streams send changes only, so a view re-reads what it missed.
// The browser retries dropped connections itself; a refused one (an HTTP error) is retried here.
export function stream(path, handlers, { onReopen } = {}) {
  const id = {};
  let source = null;
  let dropped = false;
  let retry = null;

  function open() {
    const url = new URL(API + path, location.href);
    if (token()) url.searchParams.set("token", token());
    source = new EventSource(url);
    source.onopen = () => {
      streams.set(id, "open");
      announce();
      if (dropped && onReopen) onReopen();
      dropped = false;
    };
    source.onerror = () => {
      if (!streams.has(id)) return;
      dropped = true;
      streams.set(id, "retry");
      announce();
      if (source.readyState === EventSource.CLOSED) retry = setTimeout(open, 3000);
    };
    for (const [event, fn] of Object.entries(handlers)) {
      source.addEventListener(event, (e) => fn(JSON.parse(e.data)));
    }
  }

  streams.set(id, "connecting");
  announce();
  ready.then(() => streams.has(id) && open());
  return {
    close() {
      clearTimeout(retry);
      source?.close();
      streams.delete(id);
      announce();
    },
  };
}
