// The job page's explain box: one input row, an attribution method, and the attributions of
// one output to every feature (POST /jobs/{id}/explain), drawn as bars; for a model that takes
// images, the image picked in the predict box, and its attributions as a heatmap over it. The
// server checks the request; its 422 errors are shown under the field they name.

import { api } from "./api.js";
import { drawAttributions, drawHeatmap } from "./charts.js";
import { shapeText } from "./images.js";
import { inputWidth, outputMeaning, parseRow } from "./predict.js";
import { formErrors, h, num } from "./ui.js";

const METHODS = {
  gradient: "gradient",
  gradient_x_input: "gradient × input",
  integrated_gradients: "integrated gradients",
};
const STEPS = 64;

function field(name, label, control) {
  const error = h("p.form-error", { id: `explain-${name}-error`, hidden: true });
  control.setAttribute("aria-describedby", error.id);
  const el = h("div.field", {}, h("label.small.muted", { for: control.id }, label), control, error);
  return { name, control, error, el };
}

// Why the server explained the output it did (`targets`): asked for, or chosen by it.
function why(asked, outputs) {
  if (asked !== undefined) return "";
  return outputs.length === 1 ? " (the only output)" : " (the predicted class)";
}

function summary(r, spec, asked) {
  const outputs = r.outputs[0];
  const target = r.targets[0];
  const meaning = outputMeaning(spec.loss, outputs);
  const gap = r.completeness_gap?.[0];
  return [
    h(
      "p.explain-facts",
      {},
      h("span", {}, "outputs ", h("span.mono", {}, `[${outputs.map((v) => num(v)).join(", ")}]`)),
      meaning && h("span", {}, ` → ${meaning}`),
      h("br"),
      h(
        "span",
        { id: "explain-target-used", dataset: { target } },
        `target: output ${target}${why(asked, outputs)}`,
      ),
    ),
    h("p.small.muted", {}, `${METHODS[r.method]}, from checkpoint ${r.checkpoint}`),
    r.completeness_gap &&
      h(
        "p.explain-gap",
        { id: "explain-gap", dataset: { gap } },
        h("strong", {}, `completeness gap ${num(gap)}`),
        h("span.small.muted", {}, " = Σ attributions − (f(x) − f(baseline)), in output units"),
      ),
  ];
}

// The input row's field, or, with a picker (a model that takes images), the picked image's.
function inputField(spec, picker) {
  if (picker) {
    const shape = shapeText(spec.model.input_shape);
    const text = h("output.small", { id: "explain-input" }, "the image picked in the predict box");
    picker.onPick((picked) => {
      text.textContent = picked.text;
    });
    return field("inputs", `input: a ${shape} image`, text);
  }
  const width = inputWidth(spec);
  const inputs = field(
    "inputs",
    `input: ${width} feature${width === 1 ? "" : "s"}, separated by commas`,
    h("input.mono", {
      id: "explain-input",
      type: "text",
      spellcheck: "false",
      autocomplete: "off",
    }),
  );
  inputs.control.value = Array(width).fill("0").join(", ");
  return inputs;
}

// `picker`: the predict box's image picker, for a model that takes images (else null).
export function explainBox(jobId, spec, picker = null) {
  const inputs = inputField(spec, picker);
  const method = field(
    "method",
    "method",
    h(
      "select",
      { id: "explain-method" },
      Object.entries(METHODS).map(([value, text]) => h("option", { value }, text)),
    ),
  );
  const target = field(
    "target",
    "target output",
    h("input", { id: "explain-target", type: "number", min: 0, step: 1, placeholder: "predicted" }),
  );
  const steps = field(
    "steps",
    "steps",
    h("input", { id: "explain-steps", type: "number", min: 1, step: 1, value: STEPS }),
  );
  const fields = [inputs, method, target, steps];
  const formError = h("p.form-error", { id: "explain-error", hidden: true });
  const chart = h("div.chart-auto", { id: "explain-chart" });
  const facts = h("div");
  const out = h("div", { id: "explain-output", "aria-live": "polite", hidden: true }, facts, chart);
  const button = h("button.btn.primary", { id: "explain-run", type: "submit" }, "Explain");

  const ig = () => method.control.value === "integrated_gradients";
  const syncSteps = () => {
    steps.control.disabled = !ig(); // the other methods take one gradient
  };
  method.control.addEventListener("change", syncSteps);
  syncSteps();

  const errors = formErrors(fields, formError);

  async function run(event) {
    event.preventDefault();
    errors.clear();
    const row = picker ? picker.picked()?.image : parseRow(inputs.control.value.trim());
    if (!row?.length) {
      errors.put("inputs", picker ? "pick or upload an image" : `type ${inputWidth(spec)} numbers`);
      return;
    }
    // The width is not checked here: the server's 422 says what the model takes.
    const body = { inputs: [row], method: method.control.value };
    const asked = target.control.value === "" ? undefined : Number(target.control.value);
    if (asked !== undefined) body.target = asked;
    if (ig()) body.steps = Number(steps.control.value);
    button.disabled = true;
    try {
      const r = await api(`/jobs/${jobId}/explain`, { method: "POST", body });
      facts.replaceChildren(...summary(r, spec, asked).filter(Boolean));
      out.hidden = false;
      if (picker) await drawHeatmap(chart, row, r.attributions[0]);
      else await drawAttributions(chart, r.attributions[0]);
    } catch (err) {
      errors.show(err);
    } finally {
      button.disabled = false;
    }
  }

  const element = h(
    "form.explain",
    { onsubmit: run, novalidate: true },
    inputs.el,
    h("div.field-row", {}, method.el, target.el, steps.el),
    h("div.row-actions", {}, formError, button),
    out,
  );
  return { element, purge: () => window.Plotly?.purge(chart) };
}
