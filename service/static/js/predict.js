// The job page's predict box: rows typed as text, outputs from the newest checkpoint
// (POST /jobs/{id}/predict), with the predicted class for classifiers.

import { api } from "./api.js";
import { h, num } from "./ui.js";

// One row of numbers, separated by commas, semicolons or spaces; null when one is not a number.
export function parseRow(line) {
  const values = line
    .split(/[\s,;]+/)
    .filter(Boolean)
    .map(Number);
  return values.every(Number.isFinite) ? values : null;
}

function parseRows(text, width) {
  const rows = [];
  const lines = text.split("\n").map((l) => l.trim());
  for (const [i, line] of lines.entries()) {
    if (!line) continue;
    const values = parseRow(line);
    if (!values) throw new Error(`line ${i + 1}: "${line}" is not a list of numbers`);
    if (values.length !== width) {
      throw new Error(`line ${i + 1} has ${values.length} values but the model takes ${width}`);
    }
    rows.push(values);
  }
  if (!rows.length) throw new Error(`type a row of ${width} numbers`);
  return rows;
}

// What the outputs mean: logits of classes, a logit of class 1, or regression values.
export function outputMeaning(loss, out) {
  if (loss === "cross_entropy" && out.length > 1) {
    const max = Math.max(...out);
    const exp = out.map((v) => Math.exp(v - max));
    const k = out.indexOf(max);
    return `class ${k} (${((100 * exp[k]) / exp.reduce((a, b) => a + b)).toFixed(1)}%)`;
  }
  if (loss === "bce" || (loss === "cross_entropy" && out.length === 1)) {
    const p = 1 / (1 + Math.exp(-out[0]));
    return `class ${p >= 0.5 ? 1 : 0} (p=${p.toFixed(3)})`;
  }
  return null;
}

// The features of one input row: an MLP's first size, or a sequential model's input_shape's.
export const inputWidth = (spec) =>
  spec.model?.sizes?.[0] ?? (spec.model?.input_shape ?? [1]).reduce((a, b) => a * b, 1);

// The submit handler of a predict form: the rows from `inputs()` (which throws what is wrong
// with them), then the answer as `table(answer, rows)`, or the server's errors, in `out`.
function predictRun(jobId, out, button, inputs, table) {
  return async (event) => {
    event.preventDefault();
    let rows;
    try {
      rows = inputs();
    } catch (err) {
      out.replaceChildren(h("p.form-error", {}, err.message));
      return;
    }
    button.disabled = true;
    try {
      const r = await api(`/jobs/${jobId}/predict`, { method: "POST", body: { inputs: rows } });
      const from = h("p.muted.small", {}, `from checkpoint ${r.checkpoint}`);
      out.replaceChildren(table(r, rows), from);
    } catch (err) {
      const errors = Array.isArray(err.detail) ? err.detail.map((e) => e.msg) : [err.message];
      out.replaceChildren(h("p.form-error", {}, errors.join("; ")));
    } finally {
      button.disabled = false;
    }
  };
}

export function predictBox(jobId, spec) {
  const width = inputWidth(spec);
  const example = Array.from({ length: width }, (_, i) => (i % 2 ? "-0.25" : "0.5")).join(", ");
  const input = h("textarea.mono", {
    id: "predict-input",
    rows: 3,
    spellcheck: "false",
    placeholder: `${example}\n(one row per line)`,
    "aria-label": "inputs, one row per line",
  });
  const out = h("div", { id: "predict-output", "aria-live": "polite" });
  const button = h("button.btn.primary", { id: "predict-run", type: "submit" }, "Predict");

  const classes = spec.loss !== "mse";
  const table = (r, rows) =>
    h(
      "table.predict-table",
      { dataset: { outputs: JSON.stringify(r.outputs) } },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "input"),
          h("th", {}, "outputs"),
          classes && h("th", {}, "predicted"),
        ),
      ),
      h(
        "tbody",
        {},
        r.outputs.map((o, i) =>
          h(
            "tr",
            {},
            h("td.mono", {}, rows[i].join(", ")),
            h("td.mono", {}, o.map((v) => num(v)).join(", ")),
            classes && h("td", {}, outputMeaning(spec.loss, o) || "–"),
          ),
        ),
      ),
    );
  const run = predictRun(jobId, out, button, () => parseRows(input.value, width), table);

  return h(
    "form.predict",
    { onsubmit: run },
    h(
      "label.small.muted",
      { for: "predict-input" },
      `${width} input${width === 1 ? "" : "s"} per row, separated by commas or spaces`,
    ),
    input,
    h("div.row-actions", {}, button),
    out,
  );
}

const row = (name, cell) => h("tr", {}, h("th", {}, name), cell);

// The predict box of a model that takes images: the picked image (see images.js) is sent as
// it is, C×H×W, and the outputs are shown beside its label when it is a validation image.
export function imagePredictBox(jobId, spec, picker) {
  const out = h("div", { id: "predict-output", "aria-live": "polite" });
  const button = h("button.btn.primary", { id: "predict-run", type: "submit" }, "Predict");
  picker.onPick(() => out.replaceChildren()); // outputs of another image would mislead

  const inputs = () => {
    if (!picker.picked()) throw new Error("pick or upload an image first");
    return [picker.picked().image];
  };
  const table = (r) => {
    const o = r.outputs[0];
    const meaning = spec.loss !== "mse" && outputMeaning(spec.loss, o);
    const label = picker.picked().label;
    return h(
      "table.predict-table",
      { dataset: { outputs: JSON.stringify(r.outputs) } },
      h("tbody", {}, [
        row("outputs", h("td.mono", {}, o.map((v) => num(v)).join(", "))),
        meaning && row("predicted", h("td", { id: "predict-class" }, meaning)),
        row("label", h("td", { id: "predict-label" }, label === null ? "–" : String(label))),
      ]),
    );
  };
  const run = predictRun(jobId, out, button, inputs, table);

  return h(
    "form.predict",
    { onsubmit: run },
    picker.element,
    h("div.row-actions", {}, button),
    out,
  );
}
