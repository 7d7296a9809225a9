// #/submit — a JSON editor seeded from examples/*.json. The JSON syntax is checked as you
// type; the server's 422 errors are listed by field path, and clicking one selects the field.

import { api } from "./api.js";
import { alert, errorText, h, readable } from "./ui.js";

const DRAFT = "shardgrad.draft";

// ("body", "optimizer", "sgd", "lr") -> "optimizer.lr": the union's tag is not a field.
function fieldPath(loc, spec) {
  let node = spec;
  let path = "";
  for (const seg of loc[0] === "body" ? loc.slice(1) : loc) {
    const isObject = node && typeof node === "object" && !Array.isArray(node);
    if (isObject && !(seg in node) && node.type === seg) continue;
    path += typeof seg === "number" ? `[${seg}]` : path ? `.${seg}` : seg;
    node = node?.[seg];
  }
  return path;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// Where a field path's value starts in the text: each key is searched after the previous one.
function locate(text, path) {
  let at = 0;
  for (const key of path.split(/\.|\[\d+\]/).filter(Boolean)) {
    const i = text.indexOf(JSON.stringify(key), at);
    if (i < 0) return null;
    at = i;
  }
  return at ? [at, text.indexOf("\n", at) < 0 ? text.length : text.indexOf("\n", at)] : null;
}

function describe(spec) {
  const m = spec.model || {};
  const o = spec.optimizer || {};
  return [
    m.sizes ? `${m.sizes.join("-")} ${m.activation || "relu"}` : null,
    spec.data?.name || spec.data?.type,
    o.type ? `${o.type} lr ${o.lr}` : null,
    spec.epochs ? `${spec.epochs} epochs` : null,
  ]
    .filter(Boolean)
    .join(" · ");
}

let lastText = null; // what the editor held when the reader left the page

export function submitView(root) {
  const editor = h("textarea.editor.mono", {
    id: "spec-editor",
    spellcheck: "false",
    autocapitalize: "off",
    "aria-label": "training spec (JSON)",
    "aria-describedby": "json-status",
  });
  const syntax = h("div.json-status.small", { id: "json-status" });
  const errors = h("div", { id: "submit-errors", "aria-live": "polite" });
  const templates = h("div.templates", {}, h("span.muted", {}, "Loading templates…"));
  const button = h("button.btn.primary", { type: "submit", id: "submit-job" }, "Submit job");

  function check() {
    lastText = editor.value;
    try {
      const value = JSON.parse(editor.value);
      if (!value || typeof value !== "object" || Array.isArray(value)) {
        throw new Error("the spec must be a JSON object { … }");
      }
      syntax.replaceChildren("✓ valid JSON");
      syntax.className = "json-status small ok";
      editor.removeAttribute("aria-invalid");
      button.disabled = false;
      return value;
    } catch (err) {
      syntax.replaceChildren(`JSON: ${err.message}`);
      syntax.className = "json-status small bad";
      editor.setAttribute("aria-invalid", "true");
      button.disabled = true;
      return null;
    }
  }

  function load(text) {
    editor.value = text;
    errors.replaceChildren();
    check();
  }

  function select(path) {
    const span = locate(editor.value, path);
    if (!span) return;
    editor.focus();
    editor.setSelectionRange(...span);
  }

  function showErrors(detail, spec) {
    const items = detail.map((e) => {
      const path = e.type === "json_invalid" ? "JSON" : fieldPath(e.loc, spec) || "spec";
      const msg = readable(e.type === "json_invalid" ? e.ctx?.error || e.msg : e.msg);
      return h(
        "li",
        {},
        h(
          "button.link.mono.path",
          { type: "button", onclick: () => select(path), title: "show it in the editor" },
          path,
        ),
        ` — ${msg}`,
      );
    });
    errors.replaceChildren(
      h(
        "div.alert.error",
        { role: "alert" },
        h("strong", {}, `The server rejected the spec (${plural(detail.length, "error")}):`),
        h("ul.field-errors", {}, items),
      ),
    );
  }

  async function submit(event) {
    event.preventDefault();
    const spec = check();
    if (!spec) return;
    button.disabled = true;
    errors.replaceChildren();
    try {
      const job = await api("/jobs", { method: "POST", body: editor.value });
      lastText = null;
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (err.status === 422 && Array.isArray(err.detail)) showErrors(err.detail, spec);
      else errors.replaceChildren(alert(`Could not submit: ${errorText(err)}`));
    } finally {
      button.disabled = false;
    }
  }

  editor.addEventListener("input", check);
  editor.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(e);
  });

  root.append(
    h("div.page-head", {}, h("h1", {}, "Submit a training job")),
    h(
      "div.submit-grid",
      {},
      h(
        "section.card",
        {},
        h("h2", {}, "Templates"),
        h("p.small.muted", {}, "From examples/*.json. Pick one, then edit it."),
        templates,
      ),
      h(
        "form.card.editor-card",
        { onsubmit: submit },
        h("div.card-head", {}, h("h2", {}, "Spec (JSON)"), syntax),
        editor,
        errors,
        h(
          "div.row-actions",
          {},
          h("span.small.muted", {}, "Ctrl+Enter submits · `shardgrad schema` prints every field"),
          button,
        ),
      ),
    ),
  );

  const draft = sessionStorage.getItem(DRAFT); // "Use as template" on a job page
  sessionStorage.removeItem(DRAFT);
  if (draft || lastText) load(draft || lastText);

  api("/examples")
    .then((examples) => {
      if (!examples.length) {
        templates.replaceChildren(h("p.muted", {}, "No examples found on the server."));
        if (!editor.value) load("{\n  \n}\n");
        return;
      }
      templates.replaceChildren(
        ...examples.map((ex) =>
          h(
            "button.template",
            { type: "button", onclick: () => load(ex.text), dataset: { name: ex.name } },
            h("span.template-name", {}, ex.name),
            h("span.small.muted", {}, describe(ex.spec)),
          ),
        ),
      );
      if (!editor.value) load((examples.find((e) => e.name === "moons") || examples[0]).text);
    })
    .catch((err) => templates.replaceChildren(alert(errorText(err))));
}
