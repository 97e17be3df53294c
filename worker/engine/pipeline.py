"""The compression pipeline: load, baseline, sensitivity, search, final, export.

`compress()` is the engine's one entry point; the CLI and the Celery task both call it. Progress goes
to a callback, which may raise `Cancelled` to stop the job at the next step boundary.
"""

from __future__ import annotations

import platform
import statistics
from importlib.metadata import version
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import allocator, export
from . import sensitivity as sens
from .adapters import adapt, attention_implementation, quantizable_layers
from .data import DataOptions
from .errors import InputError
from .evaluation import Evaluator
from .kernels import Backend, LatencyProfile, choose_backend, float_model
from .latency import Latency, LatencyOptions, measure
from .plan import Plan
from .artifact import model_size_bytes, save_artifact
from .report import STATUS_MESSAGES, Baseline, Final, Report
from .search import REFINEMENT_STEPS, SELECTIONS, Budget, cost_aware_order, max_evaluations, search
from .sources import load_model
from .spec import parse_source

PHASES = ("load", "baseline", "sensitivity", "profile", "search", "final", "onnx", "export")

# Below this many test samples the test-split figure is too coarse to lean on.
MIN_TEST_SAMPLES = 50
# A top-1 metric over fewer distinct predicted classes than this cannot tell plans apart.
MIN_DISTINCT_CLASSES = 5


@dataclass
class Progress:
    phase: str
    fraction: float  # of the whole job, 0..1
    message: str = ""
    step: int | None = None
    steps: int | None = None
    phases: dict = field(default_factory=dict)  # seconds of each phase finished so far


# Share of the job's progress bar each phase takes (sensitivity and search dominate the time).
PHASE_WEIGHTS = {"load": 0.05, "baseline": 0.05, "sensitivity": 0.3, "profile": 0.1, "search": 0.3, "final": 0.1,
                 "onnx": 0.05, "export": 0.05}


@dataclass
class CompressOptions:
    budget: Budget
    sensitivity: sens.SensitivityOptions = field(default_factory=sens.SensitivityOptions)
    data: DataOptions = field(default_factory=DataOptions)
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    selection: str = "cost-aware"  # how the order trades accuracy cost against measured speed
    exports: tuple[str, ...] = ()  # deployable formats besides the torch artifact: "onnx" (needs out_dir)
    device: str = "cpu"
    low_precision: str = "int8"
    threads: int | None = None
    model_root: Path | None = None
    cache_dir: Path = Path("var/cache")
    out_dir: Path | None = None
    # Warm start: an earlier analysis of the same revision and data (see Sensitivity.from_report).
    reuse_sensitivity: sens.Sensitivity | None = None
    revision: str | None = None  # already resolved by the caller (a local folder is hashed once)

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}")

    @classmethod
    def from_request(cls, request: dict, *, interlayer_weight: float = 0.5, hutchinson_tol: float = 0.1,
                     latency_repeats: int = 15, profile_seconds: float = 0.5, **runtime) -> "CompressOptions":
        """A job request (the API's and the CLI's one vocabulary, already validated) in the engine's terms;
        `runtime` is where and how this process runs it (device, threads, model_root, cache_dir, out_dir)."""
        budget, data, samples = request["budget"], request.get("data") or {}, request["hutchinson_samples"]
        return cls(
            budget=Budget(budget["max_drop"], budget.get("min_drop", 0.0), budget.get("mode", "relative")),
            sensitivity=sens.SensitivityOptions(ordering=request["ordering"], interlayer=request["interlayer"],
                                                interlayer_weight=interlayer_weight,
                                                hutchinson_max_samples=samples,
                                                hutchinson_min_samples=min(4, samples), hutchinson_tol=hutchinson_tol),
            data=DataOptions(**{k: v for k, v in data.items() if v is not None or k == "label_column"},
                             calibration_samples=request["calibration_samples"],
                             eval_samples=request["eval_samples"],
                             test_samples=request.get("test_samples", DataOptions.test_samples),  # older requests
                             batch_size=request["batch_size"], seq_len=request["seq_len"]),
            latency=LatencyOptions(repeats=latency_repeats, profile_seconds=profile_seconds),
            selection=request.get("selection", "cost-aware"),
            exports=tuple(request.get("exports", ())),
            low_precision=request["precisions"][0],
            **{k: v for k, v in runtime.items() if v is not None},
        )


class _Tracker:
    def __init__(self, callback: Callable[[Progress], None] | None):
        self.callback = callback or (lambda p: None)
        self.phases: dict[str, float] = {}
        self.current = "load"

    def fraction(self, phase: str, within: float) -> float:
        done = sum(PHASE_WEIGHTS[p] for p in PHASES[:PHASES.index(phase)])
        return min(1.0, round(done + PHASE_WEIGHTS[phase] * max(0.0, min(1.0, within)), 6))

    def report(self, within: float, message: str = "", step: int | None = None, steps: int | None = None):
        self.callback(Progress(self.current, self.fraction(self.current, within), message, step, steps,
                               dict(self.phases)))

    @contextmanager
    def phase(self, name: str):
        self.current = name
        self.report(0.0, f"{name} started")
        started = time.perf_counter()
        yield
        self.phases[name] = round(time.perf_counter() - started, 3)
        self.report(1.0, f"{name} done in {self.phases[name]:.1f}s")


def _environment(device: str, backend: str, attention: str | None) -> dict:
    import transformers

    return {
        "torch": torch.__version__, "torchao": version("torchao"), "transformers": transformers.__version__,
        "device": device, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "quantized_engine": torch.backends.quantized.engine, "backend": backend,
        "attention": attention or "none (the model has no attention layers)", "allocator": allocator.description(),
    }


@dataclass
class Workbench:
    """A loaded model with its float baseline, evaluator, kernel backend and calibration inputs."""

    source: str
    revision: str
    task: str
    adapter: torch.nn.Module
    evaluator: Evaluator
    backend: Backend
    calibration: list[tuple[torch.Tensor, ...]]
    baseline_precision: str
    device: str

    @property
    def candidates(self) -> list[str]:
        return self.backend.candidates

    @property
    def example(self) -> tuple[torch.Tensor, ...]:
        return self.calibration[0]

    def plan(self, low: list[str], low_precision: str) -> Plan:
        """The plan with `low` in low precision and every other candidate in the baseline precision."""
        chosen = set(low)
        return Plan(layers={n: low_precision if n in chosen else self.baseline_precision for n in self.candidates},
                    baseline_precision=self.baseline_precision, device=self.device, backend=self.backend.name,
                    source=self.source, revision=self.revision,
                    calibration={"batches": len(self.calibration), "data": self.evaluator.data.description})

    def build(self, plan: Plan) -> torch.nn.Module:
        return self.backend.build(plan, self.calibration)


def prepare(source: str, options: CompressOptions) -> Workbench:
    """Load the model and its data, put it in the baseline precision and pick the kernel backend."""
    spec = parse_source(source)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda requested but no GPU is available")
    loaded = load_model(spec, options.data, options.model_root, options.cache_dir, options.revision)
    baseline_precision = "fp32" if options.device == "cpu" else "fp16"
    adapter = float_model(adapt(loaded.model, loaded.task), baseline_precision, options.device)
    data = _to_device(loaded.data, options.device, next(adapter.parameters()).dtype)
    evaluator = Evaluator(adapter, data, loaded.task, loaded.metric)
    calibration = evaluator.batches("calibration")
    backend = choose_backend(adapter, options.device, calibration[0])
    if not backend.candidates:
        raise InputError(f"{source} has no layers the {backend.name} backend can quantize")
    return Workbench(str(spec), loaded.revision, loaded.task, adapter, evaluator, backend, calibration,
                     baseline_precision, options.device)


def _data_warnings(bench: Workbench) -> list[str]:
    evaluator, data = bench.evaluator, bench.evaluator.data
    warnings = []
    if data.synthetic:
        warnings.append("the metric is measured on synthetic random inputs: it says nothing about real data")
    if data.sizes["test"] < MIN_TEST_SAMPLES:
        warnings.append(f"the test split has only {data.sizes['test']} samples: its metric is coarse")
    if evaluator.metric_name.startswith("top1"):
        classes = evaluator.distinct_predictions("evaluation")
        if classes < MIN_DISTINCT_CLASSES:
            warnings.append(f"the fp32 model predicts only {classes} distinct class(es) on the evaluation split, "
                            f"so {evaluator.metric_name} can hardly tell plans apart")
    return warnings


def select(analysis: sens.Sensitivity, profile: LatencyProfile, eligible: list[str], options: CompressOptions
           ) -> list[str]:
    """The order the search bisects over. Cost-aware: accuracy cost (the sensitivity score) per millisecond
    the layer saves; sensitivity: the ordering alone. A random ordering has no scores and stays random."""
    eligible_set = set(eligible)
    ordering = [n for n in analysis.ordering if n in eligible_set]
    if options.selection == "sensitivity" or options.sensitivity.ordering == "random":
        return ordering
    scores = {layer.name: layer.score for layer in analysis.layers}
    return cost_aware_order(ordering, scores, {n: profile.saving(n) for n in ordering})


def _latency_model(profile: LatencyProfile, steps: list) -> dict:
    """How the latency model was obtained, and how it fared against every plan the search timed."""
    timed = [s for s in steps if s.latency_ms is not None]
    errors = [abs(s.predicted_latency_ms - s.latency_ms) / s.latency_ms for s in timed]
    return {**profile.to_dict(), "timed_plans": len(timed),
            "median_relative_error": statistics.median(errors) if errors else None}


def compress(source: str, options: CompressOptions, progress: Callable[[Progress], None] | None = None) -> Report:
    """Run the whole pipeline and return the report (also written to `options.out_dir` if set)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    track = _Tracker(progress)

    with track.phase("load"):
        bench = prepare(source, options)
        evaluator, example = bench.evaluator, bench.example
        warnings = [bench.backend.fallback] if bench.backend.fallback else []
        warnings += _data_warnings(bench)

    with track.phase("baseline"):
        baseline = bench.backend.baseline
        baseline_metric = evaluator.metric(baseline)
        baseline_test = evaluator.metric(baseline, "test")
        baseline_latency = measure(baseline, example, options.latency)
        baseline_size = model_size_bytes(baseline)

    with track.phase("sensitivity"):
        reused = options.reuse_sensitivity
        if reused is not None and sorted(reused.ordering) == sorted(bench.candidates):
            analysis = reused
            track.report(1.0, "reused the stored sensitivity analysis")
        else:
            simulation = bench.backend.simulation(bench.calibration)
            analysis = sens.analyse(simulation, evaluator, bench.candidates, options.sensitivity, bench.adapter,
                                    progress=lambda f, m: track.report(f, m))
        warnings += analysis.warnings

    with track.phase("profile"):
        profile = bench.backend.profile(bench.calibration, options.latency.profile_seconds)
        eligible = [n for n in bench.candidates if profile.measurable(n)]
        order = select(analysis, profile, eligible, options)

    models: dict[tuple, torch.nn.Module] = {}
    latencies: dict[tuple, Latency] = {}
    evaluated = 0

    def evaluate(low: list[str]) -> float:
        models[tuple(low)] = bench.build(bench.plan(low, options.low_precision))
        return evaluator.metric(models[tuple(low)])

    def on_step(step, low, cap):
        nonlocal evaluated
        evaluated += 1
        key = tuple(low)
        step.predicted_latency_ms = profile.predict_ms(low)
        if step.accepted:  # only points within budget can be returned, so only they are timed
            latencies[key] = measure(models[key], example, options.latency)
            step.latency_ms = latencies[key].median
        else:
            del models[key]
        track.report(evaluated / cap, f"{step.stage} k={step.k}: {evaluator.metric_name} {step.metric:.4f}",
                     step=evaluated, steps=cap)

    with track.phase("search"):
        # Nothing to trade: spending accuracy on layers that save no time would only make the model worse.
        result = search(order, evaluate, baseline_metric, options.budget, on_step=on_step) if order else None

    with track.phase("final"):
        fastest = min(latencies, key=lambda key: latencies[key].median) if latencies else ()
        if fastest:
            # Re-time baseline and candidate back to back so both see the same machine load.
            baseline_latency = measure(baseline, example, options.latency)
            latencies[fastest] = measure(models[fastest], example, options.latency)
        faster = bool(fastest) and latencies[fastest].median < baseline_latency.median
        status = ("compressed" if faster else "no_speedup" if latencies else "none_fit" if result
                  else "no_saving")
        final_low = list(fastest) if faster else []
        final_model = models[fastest] if faster else baseline
        final_plan = bench.plan(final_low, options.low_precision)
        steps = result.steps if result else []
        final_metric = next((s.metric for s in steps if s.accepted and s.low(order) == final_low), baseline_metric)
        # The one look at the test split: no decision above used it.
        final_test = evaluator.metric(final_model, "test") if final_low else baseline_test
        final = Final(metric=final_metric, test_metric=final_test,
                      latency_ms=(latencies[fastest] if faster else baseline_latency).to_dict(),
                      size_bytes=model_size_bytes(final_model) if final_low else baseline_size,
                      drop=options.budget.drop(baseline_metric, final_metric),
                      test_drop=options.budget.drop(baseline_test, final_test), k=len(final_low))
        if final_low and not options.budget.accepts(final.test_drop):
            warnings.append(f"on the test split the plan drops {final.test_drop:.4f}, over the budget of "
                            f"{options.budget.max_drop} that it meets on the evaluation split ({final.drop:.4f})")
        for step in steps:
            step.chosen = bool(final_low) and step.accepted and step.low(order) == final_low

    with track.phase("onnx"):
        exports = {}
        if "onnx" in options.exports and options.out_dir:
            exports["onnx"] = _onnx(bench, final_plan, final, baseline_metric, options, warnings)

    data = evaluator.data
    layers = quantizable_layers(bench.adapter)
    report = Report(
        source=bench.source, revision=bench.revision, task=bench.task, status=status, message=STATUS_MESSAGES[status],
        warnings=warnings,
        environment=_environment(options.device, bench.backend.name, attention_implementation(bench.adapter)),
        backend={"name": bench.backend.name, "note": bench.backend.note, "low_precision": options.low_precision},
        data={"description": data.description, "synthetic": data.synthetic, **data.sizes,
              "batch_size": options.data.batch_size, "seq_len": options.data.seq_len},
        metric={"name": evaluator.metric_name, "labelled": evaluator.labelled},
        budget=asdict(options.budget),
        baseline=Baseline(metric=baseline_metric, test_metric=baseline_test, latency_ms=baseline_latency.to_dict(),
                          size_bytes=baseline_size, precision=bench.baseline_precision),
        final=final,
        latency_reduction=1 - final.latency_ms["median"] / baseline_latency.median,
        layers=[{**layer.to_dict(), "precision": final_plan.layers[layer.name],
                 "latency_saving_ms": profile.saving(layer.name),
                 "saving_noise_ms": profile.savings[layer.name].noise_ms,
                 "excluded": None if layer.name in eligible else "no measurable latency saving"}
                for layer in analysis.layers],
        skipped_layers=[{"name": name, "kind": type(layers[name]).__name__, "reason": reason}
                        for name, reason in bench.backend.skipped.items()],
        search={
            "ordering": options.sensitivity.ordering,
            "selection": options.selection,
            "order": order,
            "method": analysis.method,
            "latency_model": _latency_model(profile, steps),
            "evaluations": len(steps),
            "max_evaluations": max_evaluations(len(order), REFINEMENT_STEPS),
            "refinement_evaluations": sum(s.stage == "refinement" for s in steps),
            "best_k": result.best_k if result else 0,
            "search_status": result.status if result else "no_saving",
            "steps": [asdict(s) for s in steps],
        },
        plan=final_plan,
        exports=exports,
    )

    with track.phase("export"):
        if options.out_dir:
            out = Path(options.out_dir)
            # The artifact re-applies from plan.json to the original model: a float plan is the original.
            files = save_artifact(final_model if final_low else bench.adapter, final_plan, out / "artifact")
            report.artifact = {name: str(path.relative_to(out)) for name, path in files.items()}
    report.phases = dict(track.phases)
    if options.out_dir:
        report.write(Path(options.out_dir) / "report.json")
    return report


def _onnx(bench: Workbench, plan: Plan, final: Final, baseline_metric: float, options: CompressOptions,
          warnings: list[str]) -> dict:
    """The plan as ONNX, measured in onnxruntime; what goes wrong there is a warning, not a failed job."""
    if not plan.low_precision_layers:
        return {"error": None, "skipped": "no low-precision plan was returned, so there is nothing to quantize"}
    try:
        result = export.export(bench.backend.baseline, list(bench.adapter.input_names), plan, bench.evaluator,
                               bench.calibration, Path(options.out_dir) / "artifact", options.device,
                               options.latency.repeats)
    except export.ExportError as exc:
        warnings.append(f"no ONNX export: {exc}")
        return {"error": str(exc)}
    figures = result.to_dict()
    figures.update(drop=options.budget.drop(baseline_metric, result.quantized.metric),
                   test_drop=options.budget.drop(baseline_metric, result.quantized.test_metric))
    if not options.budget.accepts(figures["drop"]):
        warnings.append(f"in onnxruntime the plan drops {figures['drop']:.4f} on the evaluation split, over the "
                        f"budget of {options.budget.max_drop} that it meets in torch ({final.drop:.4f})")
    if result.latency_reduction <= 0:
        warnings.append(f"in onnxruntime the int8 file is not faster than the float file "
                        f"({result.quantized.latency_ms:.2f} vs {result.float.latency_ms:.2f} ms per batch)")
    return figures


def _to_device(data, device: str, dtype: torch.dtype):
    """Inputs on the model's device; float inputs (pixels) in the model's dtype, ids and labels unchanged."""
    for split in (data.calibration, data.evaluation, data.test):
        for batch in split:
            for key, value in batch.items():
                batch[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return data
