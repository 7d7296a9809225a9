// A transformer job's boxes on the job page: generate (POST /jobs/{id}/generate: the
// completion, each token with its log-probability), token attributions (POST /jobs/{id}/explain
// with a prompt: the prompt's characters coloured by their integrated gradients) and the
// attention view (POST /jobs/{id}/attention: one layer's and head's weights as a heatmap). The
// server checks every request; its 422 errors are shown under the field they name.

import { api } from "./api.js";
import { plotly } from "./charts.js";
import { formErrors, h, num } from "./ui.js";

const SIGN = { positive: "37, 99, 235", negative: "220, 38, 38" }; // as the attribution bars

// A small form: labelled fields, their errors from a 422, a submit button, an output area.
// `fields`: [name, label, control]; `send(values)` returns the output's children, and
// `placed()`, if given, runs once they are in the page (a chart needs its size).
function form(prefix, fields, buttonText, send, placed = null) {
  const made = fields.map(([name, label, control]) => {
    control.id = `${prefix}-${name}`;
    const error = h("p.form-error", { id: `${prefix}-${name}-error`, hidden: true });
    control.setAttribute("aria-describedby", error.id);
    const el = h("div.field", {}, h("label.small.muted", { for: control.id }, label), control);
    el.append(error);
    return { name, control, error, el };
  });
  const formError = h("p.form-error", { id: `${prefix}-error`, hidden: true });
  const out = h("div", { id: `${prefix}-output`, "aria-live": "polite", hidden: true });
  const button = h("button.btn.primary", { id: `${prefix}-run`, type: "submit" }, buttonText);

  const errors = formErrors(made, formError);

  async function run(event) {
    event.preventDefault();
    errors.clear();
    button.disabled = true;
    try {
      const values = Object.fromEntries(made.map((f) => [f.name, f.control.value]));
      out.replaceChildren(...(await send(values)).filter(Boolean));
      out.hidden = false;
      await placed?.();
    } catch (err) {
      errors.show(err);
    } finally {
      button.disabled = false;
    }
  }

  const [first, ...rest] = made;
  const element = h(
    "form.explain",
    { onsubmit: run, novalidate: true },
    first.el,
    rest.length > 0 && h("div.field-row", {}, rest.map((f) => f.el)),
    h("div.row-actions", {}, formError, button),
    out,
  );
  return element;
}

const text = (value, attrs = {}) =>
  h("input.mono", { type: "text", spellcheck: "false", autocomplete: "off", value, ...attrs });
const number = (value, attrs = {}) => h("input", { type: "number", value, ...attrs });
// A number field's value for the body: "" is left out (the server's default).
const optional = (value) => (value === "" ? undefined : Number(value));
// A token as it reads in a row of chips: spaces and line breaks made visible.
const shown = (ch) => ({ " ": "␣", "\n": "↵", "\t": "⇥" })[ch] ?? ch;

// A prompt a trained job of the builtin tasks answers, else the first characters of its
// vocabulary; the user types their own.
function examplePrompt(spec) {
  const task = spec.data?.type === "builtin" ? spec.data.name : null;
  if (task === "addition") return "12+34=";
  if (task === "reverse") return "1234=";
  return "";
}

export function generateBox(jobId, spec) {
  const fields = [
    ["prompt", "prompt", text(examplePrompt(spec))],
    ["max_tokens", "max tokens", number(8, { min: 1, max: 256, step: 1 })],
    ["temperature", "temperature", number(0, { min: 0, step: 0.1 })],
    ["seed", "seed", number(0, { min: 0, step: 1 })],
  ];
  return form("generate", fields, "Generate", async (v) => {
    const body = { prompt: v.prompt, max_tokens: optional(v.max_tokens) };
    body.temperature = optional(v.temperature);
    body.seed = optional(v.seed);
    const r = await api(`/jobs/${jobId}/generate`, { method: "POST", body });
    const chars = [...r.text];
    const chips = chars.map((ch, i) =>
      h(
        "span.token",
        { dataset: { logprob: r.logprobs[i] }, title: `log p = ${r.logprobs[i]}` },
        h("span.mono", {}, shown(ch)),
        h("small", {}, num(r.logprobs[i], 3)),
      ),
    );
    return [
      h(
        "p.explain-facts",
        {},
        h("span.muted", {}, v.prompt),
        h("strong.mono", { id: "generate-text" }, r.text),
      ),
      h("div.tokens", { id: "generate-tokens" }, chips),
      h("p.small.muted", {}, `each token's log-probability; from checkpoint ${r.checkpoint}`),
    ];
  });
}

export function tokenExplainBox(jobId, spec) {
  const fields = [
    ["prompt", `prompt: at most ${spec.model.context} characters`, text(examplePrompt(spec))],
    ["target", "next token", text("", { placeholder: "greedy", maxlength: 1 })],
    ["steps", "steps", number(64, { min: 1, max: 1024, step: 1 })],
  ];
  return form("lm-explain", fields, "Explain", async (v) => {
    const body = { prompt: v.prompt, steps: optional(v.steps) };
    if (v.target !== "") body.target = v.target;
    const r = await api(`/jobs/${jobId}/explain`, { method: "POST", body });
    const max = Math.max(...r.attributions.map(Math.abs)) || 1;
    const chips = r.tokens.map((ch, i) => {
      const a = r.attributions[i];
      const rgb = a < 0 ? SIGN.negative : SIGN.positive;
      const style = { background: `rgba(${rgb}, ${(0.85 * Math.abs(a)) / max})` };
      const attrs = { style, dataset: { attribution: a }, title: `${shown(ch)}: ${a}` };
      return h("span.token", attrs, h("span.mono", {}, shown(ch)), h("small", {}, num(a, 3)));
    });
    const why = body.target === undefined ? " (the greedy next token)" : "";
    return [
      h("p.explain-facts", {}, `next token `, h("strong.mono", {}, shown(r.target)), why),
      h("div.tokens", { id: "lm-explain-tokens" }, chips),
      h(
        "p.explain-gap",
        { id: "lm-explain-gap", dataset: { gap: r.completeness_gap } },
        h("strong", {}, `completeness gap ${num(r.completeness_gap)}`),
        h("span.small.muted", {}, ` = Σ attributions − (logit ${num(r.logit)} − `),
        h("span.small.muted", {}, `logit from zero embeddings ${num(r.baseline_logit)})`),
      ),
      h("p.small.muted", {}, `integrated gradients, from checkpoint ${r.checkpoint}`),
    ];
  });
}

// The attention heatmap: query tokens down, key tokens across, weights 0 to 1.
async function drawAttention(div, tokens, weights) {
  const Plotly = await plotly();
  const labels = tokens.map((ch, i) => `${i} ${shown(ch)}`);
  const heat = {
    type: "heatmap",
    z: weights,
    x: labels,
    y: labels,
    zmin: 0,
    zmax: 1,
    colorscale: [
      [0, "#ffffff"],
      [1, "#1d4ed8"],
    ],
    colorbar: { title: { text: "weight" }, thickness: 12 },
    hovertemplate: "query %{y} → key %{x}: %{z:.4f}<extra></extra>",
  };
  const axis = { type: "category", showgrid: false, zeroline: false, automargin: true };
  const font = getComputedStyle(document.body).fontFamily;
  const layout = {
    height: Math.min(560, 160 + 24 * tokens.length),
    margin: { l: 10, r: 10, t: 10, b: 10 },
    font: { family: font, size: 12, color: "#334155" },
    paper_bgcolor: "rgba(0,0,0,0)",
    xaxis: { ...axis, title: { text: "key (attended to)" }, side: "top" },
    yaxis: { ...axis, title: { text: "query" }, autorange: "reversed", scaleanchor: "x" },
  };
  const config = { displaylogo: false, responsive: true };
  await Plotly.react(div, [heat], layout, config);
}

export function attentionView(jobId, spec) {
  const chart = h("div.chart-auto", { id: "attention-chart" });
  const layer = h("select", { id: "attention-layer" });
  const head = h("select", { id: "attention-head" });
  const options = (select, n, name) => {
    const all = Array.from({ length: n }, (_, i) => h("option", { value: i }, `${name} ${i}`));
    select.replaceChildren(...all);
  };
  options(layer, spec.model.layers, "layer");
  options(head, spec.model.heads, "head");
  let result = null;
  async function redraw() {
    if (!result) return;
    const [l, k] = [layer.value, head.value];
    await drawAttention(chart, result.tokens, result.weights[l][k]);
    Object.assign(chart.dataset, { layer: l, head: k }); // what it shows, once drawn
  }
  layer.addEventListener("change", redraw);
  head.addEventListener("change", redraw);
  const limit = `prompt: at most ${spec.model.context} characters`;
  const fields = [["prompt", limit, text(examplePrompt(spec))]];
  const send = async (v) => {
    result = await api(`/jobs/${jobId}/attention`, { method: "POST", body: { prompt: v.prompt } });
    return [
      h(
        "div.field-row.attention-pickers",
        {},
        h("label.small.muted", {}, "layer ", layer),
        h("label.small.muted", {}, "head ", head),
      ),
      chart,
      h("p.small.muted", {}, `softmax weights (causal), from checkpoint ${result.checkpoint}`),
    ];
  };
  const element = form("attention", fields, "Show attention", send, redraw);
  return { element, purge: () => window.Plotly?.purge(chart) };
}
