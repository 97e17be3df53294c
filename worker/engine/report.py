"""`report.json`: the contract other tools (service, dashboard, scripts) read, and its terminal rendering.

One `Report`, built by `compress()`, stored by the service, served by the API and read by the
dashboard. Versioned like the `Plan` it embeds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .kernels.base import SEPARATOR, split_item
from .kernels import WHOLE_CAST
from .plan import Plan

REPORT_FORMAT = "mixq.report/3"

# The statuses whose returned model is not the baseline.
RETURNS_A_PLAN = ("compressed", "float_cast")

STATUS_MESSAGES = {
    "compressed": "mixed-precision plan within budget and faster than the baseline",
    "no_speedup": "plans within budget were measured, none beat the baseline: the baseline is returned",
    "none_fit": "even one low-precision layer exceeds the budget: the baseline is returned",
    "no_saving": "no layer saves measurable time in low precision on this machine: the baseline is returned",
    "float_cast": "casting the whole model to this machine's fastest float is within budget and at least as fast as "
                  "every plan: the cast model is returned",
}


@dataclass
class Measured:
    """One model's figures: the metric on the evaluation split (which decisions used) and on the test
    split (which none did), its latency and its serialised size."""

    metric: float
    test_metric: float
    latency_ms: dict  # median, p90, runs
    size_bytes: int


@dataclass
class Baseline(Measured):
    precision: str = "fp32"


@dataclass
class Final(Measured):
    drop: float = 0.0  # on the evaluation split, as the budget defines it
    test_drop: float = 0.0
    k: int = 0  # layers in low precision
    stderr: float = 0.0  # of the evaluation drop, paired over samples
    test_stderr: float = 0.0
    test_drop_interval: list[float] = field(default_factory=list)  # 95%, two-sided
    accepted_by: str | None = None  # the step and rule that admitted the plan


@dataclass
class Report:
    source: str
    revision: str
    task: str
    status: str
    message: str
    warnings: list[str]  # every fallback, or figure to read with care, in a sentence
    environment: dict
    backend: dict
    data: dict
    metric: dict
    budget: dict
    baseline: Baseline
    final: Final
    latency_reduction: float  # the median over paired rounds; `latency` has its interval
    layers: list[dict]  # per candidate: sensitivity figures and the chosen precision
    skipped_layers: list[dict]  # quantizable layers that are not candidates, and why
    search: dict
    plan: Plan
    phases: dict = field(default_factory=dict)
    artifact: dict | None = None
    warm_start: dict | None = None
    exports: dict = field(default_factory=dict)  # deployable formats: {"onnx": figures measured in onnxruntime}
    latency: dict = field(default_factory=dict)  # the final timing: reduction with its interval, and how
    cost: dict = field(default_factory=dict)  # samples through forward/timed/simulated/backward passes, seconds
    # A language model's generation speeds (decode tokens/s, time to first token) and memory, against fp32.
    generation: dict | None = None
    format: str = REPORT_FORMAT

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(baseline=asdict(self.baseline), final=asdict(self.final), plan=self.plan.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} report")
        return cls(**{**data, "baseline": Baseline(**data["baseline"]), "final": Final(**data["final"]),
                      "plan": Plan.from_dict(data["plan"])})

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, path: Path) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _ms(latency: dict) -> str:
    return f"{latency['median']:.2f} ms (p90 {latency['p90']:.2f})"


def _cost(spent: dict) -> str:
    return (f"{spent['forward']:,} forward, {spent['timed']:,} timed, {spent['simulated']:,} simulated, "
            f"{spent['backward']:,} backward samples, {spent['seconds']:.1f}s")


def _generation_lines(report: Report) -> list[str]:
    """A language model's perplexity and generation speeds."""
    lines = []
    perplexity = report.metric.get("perplexity")
    if perplexity:
        lines.append(f"perplexity {perplexity['baseline']:.2f} -> {perplexity['final']:.2f} on the evaluation split, "
                     f"{perplexity['baseline_test']:.2f} -> {perplexity['final_test']:.2f} on the test split")
    figures = report.generation
    if figures:
        decode, prefill = figures["decode"], figures["prefill"]
        lines.append(f"decode {decode['baseline_tokens_per_second']:.1f} -> {decode['plan_tokens_per_second']:.1f} "
                     f"tokens/s at batch 1; time to first token ({prefill['prompt_tokens']}-token prompt) "
                     f"{prefill['baseline_ms']:.1f} -> {prefill['plan_ms']:.1f} ms; weights "
                     f"{figures['memory']['weights_bytes'] / 1e6:.1f} MB")
    return lines


def _gguf_lines(gguf: dict | None) -> list[str]:
    """A plan searched in llama.cpp: its file, its perplexity there, its speed against the F16 file and torch fp32."""
    if not gguf:
        return []
    decode, prefill, runtime = gguf["decode"], gguf["prefill"], gguf["runtime"]
    speeds = decode["tokens_per_second"]
    types = ", ".join(f"{count} {ggml_type}" for ggml_type, count in gguf["tensor_types"].items())
    return ["", f"gguf (llama.cpp {runtime['llama_cpp']}, CPU kernels {runtime['cpu_variant']}): {gguf['file']}, "
                f"{gguf['size_bytes'] / 1e6:.1f} MB ({types}); perplexity {gguf['perplexity']['evaluation']:.2f} "
                f"(test {gguf['perplexity']['test']:.2f}) against {gguf['f16_file']['perplexity']['evaluation']:.2f} "
                f"({gguf['f16_file']['perplexity']['test']:.2f}) for the F16 file",
            f"  decode {speeds['gguf']:.1f} tokens/s against {speeds['f16_file']:.1f} (F16 file, llama.cpp) and "
            f"{speeds['torch_fp32']:.1f} (torch fp32); time to first token {prefill['f16_file']['gguf_ms']:.1f} ms "
            f"against {prefill['f16_file']['other_ms']:.1f} and {prefill['torch_fp32']['other_ms']:.1f} ms"]


def _layer_and_format(candidate: str, low_precision: str) -> tuple[str, str]:
    """A report's candidate is a layer name, or a `layer@format` item where a layer has several formats."""
    return split_item(candidate) if SEPARATOR in candidate else (candidate, low_precision)


def _low_precision_share(report: Report) -> str:
    """How many of the model's layers the returned model runs below its baseline precision. A report's `layers`
    lists candidates, which are `layer@format` items where a layer has several formats: count layers."""
    if report.plan.backend == WHOLE_CAST:
        return f"every layer in {report.plan.baseline_precision} (the whole model cast)"
    layers = {_layer_and_format(layer["name"], "")[0] for layer in report.layers}
    return f"{report.final.k}/{len(layers)} layers low precision"


def _excluded(items: list[str], low_precision: str, shown: int = 12) -> str:
    """The candidates kept float because they save no time: named when few, counted per format when many
    (a language model has hundreds; every one is in the report's layers)."""
    if len(items) <= shown:
        return ", ".join(items)
    per_format: dict[str, int] = {}
    for item in items:
        precision = _layer_and_format(item, low_precision)[1]
        per_format[precision] = per_format.get(precision, 0) + 1
    return (f"{len(items)} candidates ("
            + ", ".join(f"{count} in {precision}" for precision, count in sorted(per_format.items()))
            + "); each is named in the report's layers")


def render(report: Report) -> str:
    """Plain-text summary for the CLI: warnings first, then the figures."""
    base, final, search = report.baseline, report.final, report.search
    metric = report.metric["name"]
    lines = [f"mixq: {report.source} ({report.revision}) - {report.status}: {report.message}", ""]
    hardware = report.environment.get("hardware")
    if hardware:
        lines += [f"measured on {hardware['description']}", ""]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines += ["" if report.warnings else None,
              f"{'':12}{metric + ' (eval)':>22}{'(test)':>10}{'latency':>28}{'size':>12}"]
    for label, side in (("baseline", base), ("final", final)):
        lines.append(f"{label:12}{side.metric:>22.4f}{side.test_metric:>10.4f}{_ms(side.latency_ms):>28}"
                     f"{side.size_bytes / 1e6:>10.2f}MB")
    budget, reduction = report.budget, (report.latency or {}).get("reduction")
    interval = (f"(95% interval {reduction['low'] * 100:.1f} to {reduction['high'] * 100:.1f}%, "
                f"{reduction['rounds']} paired rounds)" if reduction else "")
    if report.status in RETURNS_A_PLAN:
        speed = (f"latency reduction {reduction['median'] * 100:.1f}% {interval}" if reduction
                 else f"latency reduction {report.latency_reduction * 100:.1f}%")
    else:  # the baseline is returned: a figure of a plan that was not returned is not its reduction
        speed = ("no latency reduction: the baseline is returned" + (
            f" (the fastest plan within budget measured {reduction['median'] * 100:.1f}% {interval} against it, "
            "not enough)" if reduction else ""))
    test_interval = final.test_drop_interval or [final.test_drop, final.test_drop]
    lines += [
        "",
        f"{speed}, drop {final.drop:.4f} ± {final.stderr:.4f} on the evaluation split, {final.test_drop:.4f} on the "
        f"test split (95% interval {test_interval[0]:.4f} to {test_interval[1]:.4f}; budget {budget['max_drop']} "
        f"{budget['mode']} at confidence {budget['confidence']}), {_low_precision_share(report)}",
    ]
    for precision, versus in (report.latency or {}).get("against", {}).items():
        if precision != base.precision and versus:
            lines.append(f"against the whole model cast to {precision}: {versus['median'] * 100:.1f}% (95% interval "
                         f"{versus['low'] * 100:.1f} to {versus['high'] * 100:.1f}%)")
    if final.accepted_by:
        lines.append(f"accepted by {final.accepted_by}")
    lines += _generation_lines(report)
    analysis = search["method"].get("analysis")
    lines += [
        "",
        f"search ({search['ordering']} ordering, {search['selection']} selection): {search['evaluations']} "
        f"evaluations (max {search['max_evaluations']}, {search['refinement_evaluations']} refinement)"
        + (f"; sensitivity analysis {analysis}" if analysis else ""),
        f"{'stage':>11}{'k':>5}{metric:>18}{'drop':>10}{'± SE':>9}{'latency ms':>12}{'predicted':>11}  accepted",
    ]
    for step in search["steps"]:
        latency = "-" if step["latency_ms"] is None else f"{step['latency_ms']:.2f}"
        predicted = "-" if step["predicted_latency_ms"] is None else f"{step['predicted_latency_ms']:.2f}"
        chosen = "  <- chosen" if step["chosen"] else ""
        skipped = f"  (skips {len(step['skipped'])})" if step["skipped"] else ""
        lines.append(f"{step['stage']:>11}{step['k']:>5}{step['metric']:>18.4f}{step['drop']:>10.4f}"
                     f"{step['stderr']:>9.4f}{latency:>12}{predicted:>11}  "
                     f"{'yes' if step['accepted'] else 'no'}{chosen}{skipped}")
    excluded = [layer["name"] for layer in report.layers if layer["excluded"]]
    if excluded:
        lines += ["", f"kept in {report.baseline.precision}, saving no time: " + _excluded(excluded, report.backend["low_precision"])]
    if report.skipped_layers:
        lines += ["", "not candidates: " + "; ".join(f"{s['name']} ({s['reason']})" for s in report.skipped_layers)]
    onnx = report.exports.get("onnx")
    if onnx and onnx.get("error") is None and "file" in onnx:
        lines += ["", f"onnx ({onnx['runtime']['providers'][0]}): {onnx['file']}, {metric} {onnx['metric']:.4f} "
                      f"(test {onnx['test_metric']:.4f}), {onnx['latency_ms']['quantized']:.2f} ms against "
                      f"{onnx['latency_ms']['float']:.2f} ms for the float file: "
                      f"{onnx['latency_reduction'] * 100:.1f}% faster in onnxruntime"]
    lines += _gguf_lines(report.exports.get("gguf"))
    lines += ["", "phases: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in report.phases.items())]
    if report.cost:
        lines.append("cost: " + _cost(report.cost["total"]))
    return "\n".join(line for line in lines if line is not None)
