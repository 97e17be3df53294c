// mixq dashboard: a thin client of the public jobs API (/v1), nothing else.
"use strict";

const PHASE_COLOURS = { load: "#6b7a99", baseline: "#8f6bd6", probe: "#3d9970", profile: "#0f8f8f", sensitivity: "#2f6fde", search: "#1a8f4c",
                        final: "#b7791f", onnx: "#a23b72", export: "#5b6478" };
const view = document.getElementById("view");
let refreshTimer = null;
const charts = {};

// ---- API ----
function apiKey() { return sessionStorage.getItem("mixq-key") || ""; }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  const banner = document.getElementById("banner");
  if (response.status === 401) {
    banner.textContent = "This server needs an API key: enter it above (mixq keys create --tenant NAME).";
    banner.hidden = false;
  } else if (response.ok) {
    banner.hidden = true;
  }
  return response;
}

async function download(path, filename) {
  const response = await api(path);
  if (!response.ok) { alert((await response.json()).detail); return; }
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link); link.click(); link.remove();
  URL.revokeObjectURL(url);
}

// ---- helpers ----
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
};
const show = (...nodes) => view.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
const pct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`);
const num = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
const budgetText = (b) => `${b.mode === "absolute" ? b.max_drop : pct(b.max_drop)} ${b.mode}`;

function progressBar(job) {
  return el("span", {},
    el("span", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                 "aria-valuenow": Math.round(job.progress * 100), "aria-label": `progress of ${job.model}` },
       el("span", { style: `width:${(job.progress * 100).toFixed(0)}%` })),
    el("span", { class: "phase" }, job.status === "running" ? `${job.phase || ""}${job.step ? ` ${job.step}/${job.steps}` : ""}` : ""));
}

function stopRefresh() { clearTimeout(refreshTimer); refreshTimer = null; }
function destroyCharts() { for (const key of Object.keys(charts)) { charts[key].destroy(); delete charts[key]; } }

// ---- jobs list + new job form ----
// The job statuses, as the API's own schema lists them.
let statusList = null;
async function statuses() {
  statusList ??= (await (await fetch("/openapi.json")).json()).components.schemas.JobOut.properties.status.enum;
  return statusList;
}

async function renderHome() {
  const models = await (await api("/v1/models")).json().catch(() => ({ builtin: [] }));
  const filter = el("select", { id: "status-filter", onchange: () => refreshList() },
    el("option", { value: "" }, "all"), ...(await statuses()).map((s) => el("option", { value: s }, s)));
  show(
    el("h1", {}, "Compression jobs"),
    newJobForm(models.builtin || []),
    el("div", { class: "actions" }, el("div", {}, el("label", { for: "status-filter" }, "Filter by status"), filter)),
    el("div", { class: "table-wrap" }, el("table", { id: "jobs-table" },
      el("caption", { class: "muted", style: "text-align:left" }, "Refreshes every 2 seconds"),
      el("thead", {}, el("tr", {}, ...["Model", "Budget", "Status", "Progress", "Reduction", "Final metric", "Created", "Finished"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", { id: "jobs-body" }))));
  await refreshList();
}

async function refreshList() {
  stopRefresh();
  const status = document.getElementById("status-filter")?.value;
  const response = await api(`/v1/jobs?limit=50${status ? `&status=${status}` : ""}`);
  const body = document.getElementById("jobs-body");
  if (!body) return;
  const jobs = response.ok ? (await response.json()).jobs : [];
  body.replaceChildren(...jobs.map((job) => {
    const open = () => { location.hash = `#/jobs/${job.id}`; };
    return el("tr", { class: "job-row", "data-job": job.id, "data-status": job.status, tabindex: 0, onclick: open,
                      onkeydown: (e) => { if (e.key === "Enter") open(); } },
      el("td", {}, el("a", { href: `#/jobs/${job.id}` }, job.model)),
      el("td", {}, budgetText(job.request.budget)),
      el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
      el("td", {}, progressBar(job)),
      el("td", {}, pct(job.latency_reduction)),
      el("td", {}, num(job.final_metric)),
      el("td", {}, when(job.created_at)),
      el("td", {}, when(job.finished_at)));
  }));
  if (!jobs.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No jobs yet: submit one above.")));
  refreshTimer = setTimeout(refreshList, 2000);
}

const FIELDS = [
  // [name, label, type, default, advanced]
  ["min_drop", "Min drop (stop once reached)", "number", "0", true],
  ["confidence", "Confidence the budget holds on new data (empty: the server's default)", "number", "", true],
  ["analysis_loss", "Classifier layers scored on (fidelity: KL to fp32; task: labels)", ["fidelity", "task"], "fidelity", true],
  ["interlayer", "Inter-layer term", ["conditional", "pairwise"], "conditional", true],
  ["batch_size", "Batch size", "number", "8", true],
  ["seq_len", "Sequence length", "number", "128", true],
  ["calibration_samples", "Calibration samples", "number", "128", true],
  ["eval_samples", "Evaluation samples", "number", "256", true],
  ["test_samples", "Test samples (scored once, never used to choose)", "number", "256", true],
  ["hutchinson_samples", "Hutchinson samples (max)", "number", "16", true],
  ["priority", "Priority (0–9, higher first)", "number", "5", true],
];

function field(name, labelText, type, value) {
  const id = `f-${name}`;
  const input = Array.isArray(type)
    ? el("select", { id, name }, ...type.map((o) => el("option", { value: o, selected: o === value }, o)))
    : el("input", { id, name, type, value, step: type === "number" ? "any" : undefined, "aria-describedby": `${id}-error` });
  return el("div", {}, el("label", { for: id }, labelText), input, el("div", { class: "field-error", id: `${id}-error`, "data-for": name }));
}

function newJobForm(builtins) {
  const datalist = el("datalist", { id: "builtin-models" }, ...builtins.map((b) => el("option", { value: `builtin:${b.name}` }, b.description)));
  const form = el("form", { id: "new-job", class: "panel", novalidate: true, onsubmit: submitJob },
    el("h2", { style: "margin-top:0" }, "New job"),
    el("div", { class: "grid" },
      el("div", {}, el("label", { for: "f-model" }, "Model"),
        el("input", { id: "f-model", name: "model", list: "builtin-models", value: builtins.length ? `builtin:${builtins[0].name}` : "", required: true, "aria-describedby": "f-model-error" }),
        el("div", { class: "field-error", id: "f-model-error", "data-for": "model" })),
      datalist,
      field("max_drop", "Budget: max drop", "number", "0.01"),
      field("mode", "Budget mode", ["relative", "absolute"], "relative"),
      field("ordering", "Ordering", ["augmented", "hessian", "random"], "augmented"),
      field("selection", "Selection", ["cost-aware", "sensitivity"], "cost-aware"),
      field("runtime", "Runtime the plan is searched in", ["torch", "onnxruntime", "llama.cpp"], "torch")),
    el("details", {}, el("summary", {}, "Advanced options"),
      el("div", { class: "grid", style: "margin-top:.6rem" }, ...FIELDS.map(([n, l, t, v]) => field(n, l, t, v)))),
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Submit job")),
    el("div", { class: "form-error", id: "form-error", role: "alert" }));
  return form;
}

async function submitJob(event) {
  event.preventDefault();
  const form = event.target;
  const value = (name) => form.elements[name].value.trim();
  const number = (name) => (value(name) === "" ? undefined : Number(value(name)));
  const body = {
    model: value("model"),
    budget: { max_drop: number("max_drop"), min_drop: number("min_drop"), mode: value("mode"), confidence: number("confidence") },
    ordering: value("ordering"), selection: value("selection"), interlayer: value("interlayer"), analysis_loss: value("analysis_loss"),
    runtime: value("runtime"),
  };
  for (const name of ["batch_size", "seq_len", "calibration_samples", "eval_samples", "test_samples", "hutchinson_samples", "priority"]) body[name] = number(name);
  form.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
  document.getElementById("form-error").textContent = "";
  const response = await api("/v1/jobs", { method: "POST", body: JSON.stringify(body) });
  if (response.ok) { refreshList(); return; }
  const detail = (await response.json()).detail;
  const problems = Array.isArray(detail) ? detail : [{ loc: ["body", "model"], msg: detail }];
  for (const problem of problems) {
    const name = [...problem.loc].reverse().find((part) => form.querySelector(`.field-error[data-for="${part}"]`));
    const target = name ? form.querySelector(`.field-error[data-for="${name}"]`) : document.getElementById("form-error");
    target.textContent = problem.msg.replace(/^Value error, /, "");
  }
}

// ---- job detail ----
async function renderJob(id) {
  const response = await api(`/v1/jobs/${id}`);
  if (!response.ok) { show(el("p", {}, (await response.json()).detail), el("a", { href: "#/" }, "Back to jobs")); return; }
  const job = await response.json();
  const report = job.status === "succeeded" ? await (await api(`/v1/jobs/${id}/report`)).json() : null;
  destroyCharts();
  show(
    el("p", {}, el("a", { href: "#/" }, "← all jobs")),
    el("h1", {}, `${job.model} `, el("span", { class: `status ${job.status}`, id: "job-status" }, job.status)),
    el("div", { class: "panel" },
      el("div", {}, progressBar(job), el("span", { class: "muted" }, `  ${job.message || ""}`)),
      el("h2", {}, "Phases"), timeline(job.phases),
      el("div", { class: "actions" },
        job.finished ? null : el("button", { class: "danger", id: "cancel-job", onclick: () => cancelJob(id) }, "Cancel job"),
        report ? el("button", { class: "secondary", onclick: () => download(`/v1/jobs/${id}/report`, `mixq-report-${id}.json`) }, "Download report") : null,
        report ? el("button", { class: "secondary", onclick: () => download(`/v1/jobs/${id}/artifact`, `mixq-${id}.zip`) }, "Download artifact") : null,
        onnxReady(report) ? el("button", { class: "secondary", id: "download-onnx", onclick: () => download(`/v1/jobs/${id}/artifact?format=onnx`, `mixq-${id}.onnx`) }, "Download ONNX") : null,
        report && report.exports && report.exports.gguf ? el("button", { class: "secondary", id: "download-gguf", onclick: () => download(`/v1/jobs/${id}/artifact?format=gguf`, `mixq-${id}.gguf`) }, "Download GGUF") : null)),
    job.status === "failed" ? el("div", { class: "panel error-panel", role: "alert", id: "error-panel" }, el("h2", { style: "margin-top:0" }, "Job failed"), el("p", {}, job.error || "no reason recorded")) : null,
    report ? warningsPanel(report) : null,
    report ? summary(report) : null,
    report ? onnxPanel(report) : null,
    report ? ggufPanel(report) : null,
    report ? el("div", { class: "charts" },
      el("div", { class: "panel" }, el("h2", { style: "margin-top:0" }, "Search: metric at each evaluated k"), el("div", { class: "chart-box" }, el("canvas", { id: "search-chart", role: "img", "aria-label": "metric versus number of low-precision layers for every evaluated point" }))),
      el("div", { class: "panel" }, el("h2", { style: "margin-top:0" }, "Sensitivity per layer (network order)"), el("div", { class: "chart-box" }, el("canvas", { id: "layer-chart", role: "img", "aria-label": "sensitivity score per layer split into Hessian and inter-layer parts, coloured by precision" })))) : null,
    report ? layerTable(report) : null);
  if (report) { searchChart(report); layerChart(report); }
  if (!job.finished) refreshTimer = setTimeout(() => renderJob(id), 2000);
}

function timeline(phases) {
  const entries = Object.entries(phases || {});
  const total = entries.reduce((sum, [, s]) => sum + s, 0) || 1;
  if (!entries.length) return el("p", { class: "muted" }, "No phase finished yet.");
  return el("div", { class: "timeline", id: "timeline" }, ...entries.map(([name, seconds]) =>
    el("div", { style: `width:${Math.max(4, (seconds / total) * 100)}%;background:${PHASE_COLOURS[name] || "#888"}`, title: `${name}: ${seconds.toFixed(1)} s` }, `${name} ${seconds.toFixed(1)}s`)));
}

function warningsPanel(report) {
  if (!report.warnings.length) return null;
  return el("div", { class: "panel warning-panel", role: "alert", id: "warnings" },
    el("h2", { style: "margin-top:0" }, "Warnings"),
    el("ul", {}, ...report.warnings.map((w) => el("li", {}, w))));
}

// Whether the returned model is a plan (or the cast), not the baseline itself (report.py's RETURNS_A_PLAN).
const returnsPlan = (report) => ["compressed", "float_cast"].includes(report.status);
const interval = (r) => (r ? `95% interval ${pct(r.low)} to ${pct(r.high)} over ${r.rounds} paired rounds` : "nothing timed against the baseline");

function summary(report) {
  const card = (label, value, sub, id) => el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), el("div", { class: "sub" }, sub));
  const b = report.baseline, f = report.final, budget = report.budget, cost = report.cost.total;
  const testInterval = f.test_drop_interval.length ? ` (95% interval ${num(f.test_drop_interval[0])} to ${num(f.test_drop_interval[1])})` : "";
  const method = report.search.method;
  // What one timed call is (a batch, a decoding step, a prompt's prefill): each latency card names it.
  const workload = (report.search.latency_workload || { name: "batch", unit: "ms per batch" });
  // A language model's budget is on perplexity: its perplexity and generation speeds come first.
  return el("div", { class: "cards", id: "summary" },
    ...generationCards(report, card),
    card(`Metric (${report.metric.name}), evaluation split`, `${num(b.metric)} → ${num(f.metric)}`,
      `drop ${num(f.drop)} ± ${num(f.stderr)} of budget ${budget.max_drop} ${budget.mode}; accepted when drop + ${budget.z.toFixed(2)}·SE fits (confidence ${budget.confidence})`),
    card("Test split (no decision used it)", `${num(b.test_metric)} → ${num(f.test_metric)}`, `drop ${num(f.test_drop)}${testInterval}`, "test-metric"),
    card(`Latency median (${workload.unit})`, `${b.latency_ms.median.toFixed(2)} → ${f.latency_ms.median.toFixed(2)} ms`, `p90 ${b.latency_ms.p90.toFixed(2)} → ${f.latency_ms.p90.toFixed(2)} ms; attention ${report.environment.attention}`),
    card(`Latency reduction (${workload.name}, what the search optimised)`, pct(report.latency_reduction), returnsPlan(report) ? `${interval(report.latency.reduction)}; ${report.message}`
      : `${report.message}${report.latency.reduction ? ` (the fastest plan within budget measured ${pct(report.latency.reduction.median)}, ${interval(report.latency.reduction)}: not returned)` : ""}`, "latency-reduction"),
    card("Size", `${(b.size_bytes / 1e6).toFixed(1)} → ${(f.size_bytes / 1e6).toFixed(1)} MB`, lowPrecisionShare(report), "size"),
    ...againstFloats(report, card),
    card("Runtime", report.backend.runtime || "torch", report.backend.name, "runtime"),
    card("Hardware", hardwareName(report), hardwareDetail(report), "hardware"),
    card("Search", `${report.search.evaluations} evaluations`, method.analysis ? `sensitivity analysis ${method.analysis}` : `max ${report.search.max_evaluations} (${report.search.refinement_evaluations} refinement), ${report.search.ordering} ordering, ${report.search.selection} selection, Hessian ${method.hessian || "–"}`),
    card("Cost", `${cost.seconds.toFixed(0)} s`, `samples through ${cost.forward.toLocaleString()} forward, ${cost.timed.toLocaleString()} timed, ${cost.simulated.toLocaleString()} simulated and ${cost.backward.toLocaleString()} backward passes`, "cost"));
}

// How many layers run below the baseline's precision (report.py's _low_precision_share): `layers` lists
// candidates, `layer@format` items where a layer has several formats, so layers are counted by name.
function lowPrecisionShare(report) {
  if (report.plan.backend === "whole-cast") return `every layer in ${report.plan.baseline_precision} (the whole model cast)`;
  const layers = new Set(report.layers.map((layer) => layer.name.split("@")[0]));
  return `${report.final.k}/${layers.size} layers ${report.backend.low_precision}`;
}

// Which machine measured every figure on this page (reports from before the hardware was recorded: its CPU field).
const hardwareName = (report) => (report.environment.hardware ? report.environment.hardware.model_name : report.environment.cpu);
function hardwareDetail(report) {
  const hw = report.environment.hardware;
  if (!hw) return `${report.environment.threads} threads; instruction sets not recorded`;
  const menu = report.backend.menu;
  return `${hw.capability} dispatch, ${hw.threads} threads; ${hw.flags.join(", ") || "no AVX2"}` +
    (menu ? `; formats offered: ${menu.offered.join(", ")} (weight-only activations ${menu.weight_only_activations}; fastest float ${menu.fastest_float})` : "");
}

// The returned model's reduction against each float it was timed with: fp32, and the whole model cast to the
// worker's fastest float where that is not fp32 (what "just cast it" would give).
function againstFloats(report, card) {
  const against = (report.latency && report.latency.against) || {};
  return Object.entries(against).filter(([precision]) => precision !== report.baseline.precision).map(([precision, r]) =>
    card(`Against the whole model in ${precision}`, r ? pct(r.median) : "returned",
      r ? interval(r) : `the ${precision} cast itself is the returned model`, `against-${precision}`));
}

// A causal language model's perplexity (the budget is on its relative increase) and generation speeds.
function generationCards(report, card) {
  const cards = [];
  const ppl = report.metric.perplexity, gen = report.generation;
  if (ppl) cards.push(card("Perplexity", `${ppl.baseline.toFixed(2)} → ${ppl.final.toFixed(2)}`, `test split ${ppl.baseline_test.toFixed(2)} → ${ppl.final_test.toFixed(2)}; budget on its relative increase`, "perplexity"));
  if (gen) {
    cards.push(card("Decode, batch 1", `${gen.decode.baseline_tokens_per_second.toFixed(1)} → ${gen.decode.plan_tokens_per_second.toFixed(1)} tokens/s`, interval(gen.decode.reduction), "decode"));
    cards.push(card("Time to first token", `${gen.prefill.baseline_ms.toFixed(1)} → ${gen.prefill.plan_ms.toFixed(1)} ms`, `${gen.prefill.prompt_tokens}-token prompt; ${interval(gen.prefill.reduction)}`, "prefill"));
  }
  return cards;
}

const onnxReady = (report) => Boolean(report && report.exports && report.exports.onnx && report.exports.onnx.file && !report.exports.onnx.error);

// The plan searched in llama.cpp: its GGUF file, perplexity and speed there, against the F16 file and torch fp32.
function ggufPanel(report) {
  const gguf = report.exports && report.exports.gguf;
  if (!gguf) return null;
  const card = (label, value, sub) => el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), el("div", { class: "sub" }, sub));
  const speeds = gguf.decode.tokens_per_second;
  const types = Object.entries(gguf.tensor_types).map(([type, count]) => `${count} ${type}`).join(", ");
  return el("div", { class: "panel", id: "gguf" },
    el("h2", { style: "margin-top:0" }, `GGUF in llama.cpp ${gguf.runtime.llama_cpp} (CPU kernels: ${gguf.runtime.cpu_variant})`),
    el("div", { class: "cards" },
      card("Perplexity", `${gguf.perplexity.evaluation.toFixed(2)} eval, ${gguf.perplexity.test.toFixed(2)} test`, `F16 file: ${gguf.f16_file.perplexity.evaluation.toFixed(2)} eval, ${gguf.f16_file.perplexity.test.toFixed(2)} test`),
      card("Decode in llama.cpp", `${speeds.gguf.toFixed(1)} tokens/s`, `F16 file ${speeds.f16_file.toFixed(1)} (${interval(gguf.decode.f16_file.reduction)}); torch fp32 ${speeds.torch_fp32.toFixed(1)}`),
      card("Time to first token", `${gguf.prefill.f16_file.gguf_ms.toFixed(1)} ms`, `F16 file ${gguf.prefill.f16_file.other_ms.toFixed(1)} ms; torch fp32 ${gguf.prefill.torch_fp32.other_ms.toFixed(1)} ms`),
      card("File", `${(gguf.size_bytes / 1e6).toFixed(1)} MB`, types)));
}

// The plan as deployed in onnxruntime: its own metric and speed-up, beside torch's.
function onnxPanel(report) {
  const onnx = report.exports && report.exports.onnx;
  if (!onnx) return null;
  if (!onnxReady(report)) return el("div", { class: "panel", id: "onnx" }, el("h2", { style: "margin-top:0" }, "ONNX"), el("p", { class: "muted" }, onnx.error ? `No ONNX export: ${onnx.error}` : onnx.skipped));
  const card = (label, value, sub) => el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), el("div", { class: "sub" }, sub));
  return el("div", { class: "panel", id: "onnx" },
    el("h2", { style: "margin-top:0" }, `ONNX in onnxruntime ${onnx.runtime.onnxruntime} (${onnx.runtime.providers[0]})`),
    el("div", { class: "cards" },
      card(`Metric (${report.metric.name})`, `${num(onnx.metric)} eval, ${num(onnx.test_metric)} test`, `drop ${num(onnx.drop)} (torch ${num(report.final.drop)})`),
      card("Latency median", `${onnx.latency_ms.float.toFixed(2)} → ${onnx.latency_ms.quantized.toFixed(2)} ms`, "float ONNX → int8 ONNX, same batch, interleaved"),
      card("Latency reduction in onnxruntime", pct(onnx.latency_reduction), `${interval(onnx.latency_interval)}; torch: ${pct(report.latency_reduction)}`),
      card("File", `${(onnx.size_bytes / 1e6).toFixed(1)} MB`, `${onnx.int8_layers} int8 layers, opset ${onnx.opset}`)));
}

function searchChart(report) {
  const steps = report.search.steps;
  const base = report.baseline.metric;
  const limit = report.budget.mode === "relative" ? base * (1 - report.budget.max_drop) : base - report.budget.max_drop;
  const ks = steps.map((s) => s.k);
  const span = [0, Math.max(...ks, report.layers.length)];
  const values = [base, limit, ...steps.map((s) => s.metric)];
  const margin = (Math.max(...values) - Math.min(...values)) * 0.15 || 0.01;
  // chosen point: gold diamond; within budget: green; over budget: red
  const colours = steps.map((s) => (s.chosen ? "#f0b429" : s.accepted ? "#1a8f4c" : "#c33b3b"));
  charts.search = new Chart(document.getElementById("search-chart"), {
    type: "scatter",
    data: { datasets: [
      { label: "evaluated point", data: steps.map((s) => ({ x: s.k, y: s.metric, latency: s.latency_ms, accepted: s.accepted, stage: s.stage })),
        pointRadius: steps.map((s) => (s.chosen ? 10 : 6)), pointStyle: steps.map((s) => (s.chosen ? "rectRot" : s.stage === "refinement" ? "triangle" : "circle")),
        backgroundColor: colours, borderColor: colours, borderWidth: 2 },
      { label: "baseline", type: "line", data: span.map((x) => ({ x, y: base })), borderColor: "#5b6478", borderDash: [4, 4], pointRadius: 0 },
      { label: "budget limit", type: "line", data: span.map((x) => ({ x, y: limit })), borderColor: "#c33b3b", pointRadius: 0 },
    ] },
    options: { maintainAspectRatio: false, animation: false,
      scales: { x: { title: { display: true, text: "k: layers in low precision" }, min: 0, max: span[1] + 1 },
                y: { title: { display: true, text: report.metric.name }, min: Math.min(...values) - margin, max: Math.max(...values) + margin } },
      plugins: { tooltip: { callbacks: { label: (c) => c.dataset.label === "evaluated point"
        ? `${c.raw.stage} k=${c.raw.x}: ${c.raw.y.toFixed(4)}${c.raw.latency ? `, ${c.raw.latency.toFixed(2)} ms` : ""}${c.raw.accepted ? "" : " (over budget)"}` : c.dataset.label } } } },
  });
}

function layerChart(report) {
  const layers = report.layers;
  const unscored = report.search.method.analysis;  // "not needed: ..." where the probe answered without one
  if (unscored) {  // say so above the chart, which then shows only what each layer saves: no flat line of zeros
    const box = document.getElementById("layer-chart").parentNode;
    box.before(el("p", { class: "muted", id: "layer-chart-note" }, `No sensitivity scores: ${unscored}.`));
  }
  // A row is a layer, or with several formats a layer in one format (its `precision` says what the plan did).
  const int8 = (l) => l.precision !== report.baseline.precision;
  charts.layers = new Chart(document.getElementById("layer-chart"), {
    type: "bar",
    data: { labels: layers.map((l, i) => String(i)), datasets: [
      { label: "Hessian part", data: layers.map((l) => l.hessian_part ?? 0), stack: "score",
        backgroundColor: layers.map((l) => (int8(l) ? "#2f6fde" : "#8a93a6")) },
      { label: "inter-layer part", data: layers.map((l) => l.interlayer_part ?? 0), stack: "score",
        backgroundColor: layers.map((l) => (int8(l) ? "#9dbdf3" : "#cfd4de")) },
      { label: "latency saving (ms)", type: "line", data: layers.map((l) => l.latency_saving_ms), yAxisID: "saving",
        borderColor: "#b7791f", backgroundColor: "#b7791f", pointRadius: 2, borderWidth: 1.5 },
    ] },
    options: { maintainAspectRatio: false, animation: false,
      scales: { x: { stacked: true, title: { display: true, text: "layer (network order)" } },
                y: { stacked: true, title: { display: true, text: "score (share)" } },
                saving: { position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "saving ms" } } },
      plugins: { legend: { labels: { generateLabels: () => [
        { text: `${report.backend.low_precision}: Hessian / inter-layer`, fillStyle: "#2f6fde" }, { text: "", fillStyle: "#9dbdf3" },
        { text: `${report.baseline.precision}: Hessian / inter-layer`, fillStyle: "#8a93a6" }, { text: "", fillStyle: "#cfd4de" },
        { text: "measured saving (ms)", fillStyle: "#b7791f" }] } },
        tooltip: { callbacks: { title: (items) => layers[items[0].dataIndex].name.replace(/^model\./, ""), afterLabel: (c) => `precision ${layers[c.dataIndex].precision}, rank ${layers[c.dataIndex].rank}` } } } },
  });
}

const LAYER_COLUMNS = [["name", "Layer"], ["kind", "Kind"], ["params", "Params"], ["hessian_trace", "Tr(H) at output"], ["trace_stderr", "± stderr"],
                       ["output_error", "Output error"], ["hessian_term", "Hessian term"], ["interlayer", "Inter-layer"], ["score", "Score"],
                       ["rank", "Rank"], ["latency_saving_ms", "Saving ms"], ["precision", "Precision"], ["formats", "Formats scored"],
                       ["excluded", "Kept float because"]];

// One row per layer. With several formats per layer the report lists a candidate per layer and format
// (`layer@format`); a layer's row shows the candidate the plan chose, or its first one where it stayed float.
function layerRows(report) {
  const rows = new Map();
  report.layers.forEach((candidate, position) => {
    const [layer, format] = candidate.name.split("@");
    const chosen = candidate.precision !== report.baseline.precision;
    const row = rows.get(layer);
    const formats = row ? `${row.formats}, ${format}` : (format || report.backend.low_precision);
    if (!row || (chosen && !row.chosen)) rows.set(layer, { ...candidate, name: layer, chosen, formats, position: row ? row.position : position });
    else row.formats = formats;
  });
  return [...rows.values()];
}

function layerTable(report) {
  let rows = layerRows(report);
  let sortKey = "position", ascending = true;
  const body = el("tbody", {});
  const fill = () => {
    rows.sort((a, b) => { const x = a[sortKey] ?? -Infinity, y = b[sortKey] ?? -Infinity; return (x > y ? 1 : x < y ? -1 : 0) * (ascending ? 1 : -1); });
    body.replaceChildren(...rows.map((l) => el("tr", {}, ...LAYER_COLUMNS.map(([key]) =>
      el("td", {}, typeof l[key] === "number" && !Number.isInteger(l[key]) ? Number(l[key]).toPrecision(3) : String(l[key] ?? "–"))))));
  };
  const header = el("tr", {}, ...LAYER_COLUMNS.map(([key, label]) => {
    const sort = () => { ascending = sortKey === key ? !ascending : true; sortKey = key; fill();
      header.querySelectorAll("th").forEach((th) => th.setAttribute("aria-sort", th.dataset.key === key ? (ascending ? "ascending" : "descending") : "none")); };
    return el("th", { scope: "col", class: "sortable", tabindex: 0, "data-key": key, "aria-sort": "none", onclick: sort, onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } } }, label);
  }));
  fill();
  const skipped = report.skipped_layers.length
    ? el("p", { class: "muted", id: "skipped-layers" }, "Not candidates: ", ...report.skipped_layers.map((l, i) => el("span", {}, i ? "; " : "", el("code", {}, l.name), ` (${l.reason})`)))
    : null;
  return el("div", { class: "panel" }, el("h2", { style: "margin-top:0" }, "Layers (click a column to sort)"),
    el("div", { class: "table-wrap" }, el("table", { id: "layer-table" }, el("thead", {}, header), body)), skipped);
}

async function cancelJob(id) {
  const response = await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
  if (!response.ok) alert((await response.json()).detail);
  stopRefresh();
  renderJob(id);
}

// ---- registry ----
const scheduleText = (s) => (s.cron ? `cron ${s.cron}` : `every ${s.interval_seconds} s`);

const HISTORY_RUNS = 50;  // the latest runs of each entry, oldest first for the chart

async function renderRegistry() {
  const response = await api("/v1/registry?limit=100");
  const entries = response.ok ? (await response.json()).entries : [];
  const rows = await Promise.all(entries.map(async (entry) => {
    const page = await (await api(`/v1/registry/${entry.id}/history?limit=${HISTORY_RUNS}`)).json();
    return { entry, history: page.runs.slice().reverse(), more: page.next_cursor !== null };
  }));
  show(
    el("h1", {}, "Registry: scheduled re-compression"),
    el("p", { class: "muted" }, "Register models with POST /v1/registry; each firing compresses a new revision and skips an unchanged one."),
    el("div", { class: "table-wrap" }, el("table", { id: "registry-table" },
      el("thead", {}, el("tr", {}, ...["Model", "Schedule", "Next run", "Last revision", "Runs", "Latency reduction per run", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...(rows.length ? rows.map(({ entry, history, more }) => el("tr", { "data-entry": entry.id },
        el("td", {}, entry.model, entry.paused ? el("span", { class: "status cancelled" }, " paused") : null),
        el("td", {}, scheduleText(entry.schedule)),
        el("td", {}, entry.paused ? "–" : when(entry.next_run_at)),
        el("td", {}, el("code", {}, (entry.last_revision || "–").slice(0, 24))),
        el("td", {}, `${history.filter((h) => h.outcome === "enqueued").length} jobs, ${history.filter((h) => h.outcome === "skipped").length} skipped${more ? ` (last ${HISTORY_RUNS} runs)` : ""}`,
           history.some((h) => h.regression) ? el("span", { class: "status failed" }, " regression") : null),
        el("td", {}, el("div", { class: "spark" }, el("canvas", { id: `spark-${entry.id}`, role: "img", "aria-label": `latency reduction history of ${entry.model}` }))),
        el("td", {},
          el("button", { class: "secondary", onclick: async () => { const run = await api(`/v1/registry/${entry.id}/run`, { method: "POST" }); if (!run.ok) alert((await run.json()).detail); renderRegistry(); } }, "Run now"), " ",
          el("button", { class: "secondary", onclick: async () => { await api(`/v1/registry/${entry.id}/${entry.paused ? "resume" : "pause"}`, { method: "POST" }); renderRegistry(); } }, entry.paused ? "Resume" : "Pause"))))
        : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No registered models."))])))));
  destroyCharts();
  for (const { entry, history } of rows) {
    const done = history.filter((h) => h.latency_reduction !== null);
    charts[entry.id] = new Chart(document.getElementById(`spark-${entry.id}`), {
      type: "line",
      data: { labels: done.map((h) => (h.revision || "").slice(0, 10)),
              datasets: [{ data: done.map((h) => h.latency_reduction * 100), borderColor: "#2f6fde",
                           pointBackgroundColor: done.map((h) => (h.regression ? "#c33b3b" : "#2f6fde")), pointRadius: 3 }] },
      options: { maintainAspectRatio: false, animation: false, plugins: { legend: { display: false } },
                 scales: { x: { display: false }, y: { ticks: { callback: (v) => `${v}%` } } } },
    });
  }
}

// ---- routing ----
function route() {
  stopRefresh();
  destroyCharts();
  const match = location.hash.match(/^#\/jobs\/([\w-]+)/);
  const page = match ? renderJob(match[1]) : location.hash.startsWith("#/registry") ? renderRegistry() : renderHome();
  page.catch((error) => { show(el("p", { role: "alert" }, `Error: ${error.message}`)); });
}

document.getElementById("api-key").value = apiKey();
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("mixq-key", document.getElementById("api-key").value.trim());
  route();
});
window.addEventListener("hashchange", route);
route();
