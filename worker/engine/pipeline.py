"""The compression pipeline: load, baseline, sensitivity, search, latency, export.

`compress()` is the engine's one entry point; the CLI and the Celery task both call it. Progress goes
to a callback, which may raise `Cancelled` to stop the job at the next step boundary.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import sensitivity as sens
from .adapters import adapt
from .data import DataOptions
from .errors import InputError
from .evaluation import Evaluator
from .latency import LatencyOptions, measure
from .plan import Plan
from .quantize import Backend, apply_plan, choose_backend, float_model, model_size_bytes, save_artifact
from .report import REPORT_FORMAT, STATUS_MESSAGES, write_report
from .search import Budget, bisect_layers, max_evaluations
from .sources import load_model, parse_source

PHASES = ("load", "baseline", "sensitivity", "search", "latency", "export")


@dataclass
class Progress:
    phase: str
    fraction: float  # of the whole job, 0..1
    message: str = ""
    step: int | None = None
    steps: int | None = None
    phases: dict = field(default_factory=dict)  # seconds of each phase finished so far


# Share of the job's progress bar each phase takes (sensitivity and search dominate the time).
PHASE_WEIGHTS = {"load": 0.05, "baseline": 0.05, "sensitivity": 0.4, "search": 0.35, "latency": 0.1, "export": 0.05}


@dataclass
class CompressOptions:
    budget: Budget
    sensitivity: sens.SensitivityOptions = field(default_factory=sens.SensitivityOptions)
    data: DataOptions = field(default_factory=DataOptions)
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    device: str = "cpu"
    low_precision: str = "int8"
    threads: int | None = None
    model_root: Path | None = None
    cache_dir: Path = Path("var/cache")
    out_dir: Path | None = None
    # Warm start: an earlier analysis of the same revision and data (see Sensitivity.from_report).
    reuse_sensitivity: sens.Sensitivity | None = None
    revision: str | None = None  # already resolved by the caller (a local folder is hashed once)


class _Tracker:
    def __init__(self, callback: Callable[[Progress], None] | None):
        self.callback = callback or (lambda p: None)
        self.phases: dict[str, float] = {}
        self.current = "load"

    def fraction(self, phase: str, within: float) -> float:
        done = sum(PHASE_WEIGHTS[p] for p in PHASES[:PHASES.index(phase)])
        return min(1.0, done + PHASE_WEIGHTS[phase] * max(0.0, min(1.0, within)))

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


def _environment(device: str, backend: str) -> dict:
    import torchao
    import transformers

    return {
        "torch": torch.__version__, "torchao": torchao.__version__, "transformers": transformers.__version__,
        "device": device, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "quantized_engine": torch.backends.quantized.engine, "backend": backend,
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
    plan_fields: dict

    @property
    def candidates(self) -> list[str]:
        return self.backend.candidates

    @property
    def example(self) -> tuple[torch.Tensor, ...]:
        return self.calibration[0]

    def plan(self, ordering: list[str], k: int, low_precision: str) -> Plan:
        return Plan.from_ordering(ordering, k, low_precision, **self.plan_fields)

    def build(self, plan: Plan) -> torch.nn.Module:
        return apply_plan(self.adapter, plan, self.calibration)


def prepare(source: str, options: CompressOptions) -> Workbench:
    """Load the model and its data, put it in the baseline precision and pick the kernel backend."""
    spec = parse_source(source)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda requested but no GPU is available")
    loaded = load_model(spec, options.data, options.model_root, options.cache_dir, options.revision)
    baseline_precision = "fp32" if options.device == "cpu" else "fp16"
    adapter = float_model(adapt(loaded.model, loaded.task), baseline_precision, options.device)
    data = _to_device(loaded.data, options.device, next(adapter.parameters()).dtype)
    evaluator = Evaluator(adapter, data, loaded.task)
    calibration = [evaluator.inputs(b) for b in data.calibration]
    backend = choose_backend(adapter, options.device)
    if not backend.candidates:
        raise InputError(f"{source} has no layers the {backend.name} backend can quantize")
    plan_fields = dict(baseline_precision=baseline_precision, device=options.device, backend=backend.name,
                       source=str(spec), revision=loaded.revision,
                       calibration={"batches": len(calibration), "data": data.description})
    return Workbench(str(spec), loaded.revision, loaded.task, adapter, evaluator, backend, calibration, plan_fields)


def compress(source: str, options: CompressOptions, progress: Callable[[Progress], None] | None = None) -> dict:
    """Run the whole pipeline and return the report (also written to `options.out_dir` if set)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    track = _Tracker(progress)

    with track.phase("load"):
        bench = prepare(source, options)
        adapter, evaluator, example = bench.adapter, bench.evaluator, bench.example
        data = evaluator.data

    with track.phase("baseline"):
        baseline = bench.backend.baseline
        baseline_metric = evaluator.metric(baseline)
        baseline_latency = measure(baseline, example, options.latency)
        baseline_size = model_size_bytes(baseline)

    with track.phase("sensitivity"):
        reused = options.reuse_sensitivity
        if reused is not None and sorted(reused.ordering) == sorted(bench.candidates):
            analysis = reused
            track.report(1.0, "reused the stored sensitivity analysis")
        else:
            analysis = sens.analyse(adapter, evaluator, bench.candidates, options.sensitivity,
                                    progress=lambda f, m: track.report(f, m))

    models: dict[int, torch.nn.Module] = {}

    def plan_for(k: int) -> Plan:
        return bench.plan(analysis.ordering, k, options.low_precision)

    def evaluate(k: int) -> float:
        models[k] = bench.build(plan_for(k))
        return evaluator.metric(models[k])

    latencies = {}
    evaluated = 0

    def on_step(step, cap):
        nonlocal evaluated
        evaluated += 1
        if step.accepted:  # only points within budget can be returned, so only they are timed
            latencies[step.k] = measure(models[step.k], example, options.latency)
            step.latency_ms = latencies[step.k].median
        else:
            del models[step.k]
        track.report(evaluated / cap, f"k={step.k}: {evaluator.metric_name} {step.metric:.4f}",
                     step=evaluated, steps=cap)

    with track.phase("search"):
        result = bisect_layers(len(bench.candidates), evaluate, baseline_metric, options.budget, on_step=on_step)

    with track.phase("latency"):
        chosen_k = min(latencies, key=lambda k: latencies[k].median) if latencies else 0
        if chosen_k:
            # Re-time baseline and candidate back to back so both see the same machine load.
            baseline_latency = measure(baseline, example, options.latency)
            latencies[chosen_k] = measure(models[chosen_k], example, options.latency)
        faster = chosen_k and latencies[chosen_k].median < baseline_latency.median
        status = "compressed" if faster else ("no_speedup" if latencies else "none_fit")
        final_k = chosen_k if faster else 0
        final_model = models[final_k] if final_k else baseline
        # The artifact must re-apply from plan.json to the original model: a float plan is the original.
        artifact_model = models[final_k] if final_k else adapter
        final_plan = plan_for(final_k)
        final_latency = latencies[final_k] if final_k else baseline_latency
        final_metric = next((s.metric for s in result.steps if s.k == final_k), baseline_metric)
        final_size = model_size_bytes(final_model) if final_k else baseline_size

    report = {
        "format": REPORT_FORMAT,
        "source": bench.source,
        "revision": bench.revision,
        "task": bench.task,
        "status": status,
        "message": STATUS_MESSAGES[status],
        "environment": _environment(options.device, bench.backend.name),
        "backend": {"name": bench.backend.name, "note": bench.backend.note, "low_precision": options.low_precision},
        "data": {"description": data.description, "synthetic": data.synthetic, **data.sizes,
                 "batch_size": options.data.batch_size, "seq_len": options.data.seq_len},
        "metric": {"name": evaluator.metric_name, "labelled": evaluator.labelled},
        "budget": asdict(options.budget),
        "baseline": {"metric": baseline_metric, "latency_ms": baseline_latency.to_dict(), "size_bytes": baseline_size,
                     "precision": bench.plan_fields["baseline_precision"]},
        "final": {"metric": final_metric, "latency_ms": final_latency.to_dict(), "size_bytes": final_size,
                  "drop": options.budget.drop(baseline_metric, final_metric), "k": final_k},
        "latency_reduction": 1 - final_latency.median / baseline_latency.median,
        "layers": [{**layer.to_dict(), "precision": final_plan.layers[layer.name]} for layer in analysis.layers],
        "search": {
            "ordering": options.sensitivity.ordering,
            "method": analysis.method,
            "evaluations": result.evaluations,
            "max_evaluations": max_evaluations(len(bench.candidates)),
            "best_k": result.best_k,
            "search_status": result.status,
            "steps": [{**asdict(s), "chosen": s.k == final_k > 0} for s in result.steps],
        },
        "plan": final_plan.to_dict(),
        "phases": {},
        "artifact": None,
    }

    with track.phase("export"):
        if options.out_dir:
            out = Path(options.out_dir)
            files = save_artifact(artifact_model, final_plan, out / "artifact")
            report["artifact"] = {name: str(path.relative_to(out)) for name, path in files.items()}
    report["phases"] = dict(track.phases)
    if options.out_dir:
        write_report(report, Path(options.out_dir) / "report.json")
    return report


def _to_device(data, device: str, dtype: torch.dtype):
    """Inputs on the model's device; float inputs (pixels) in the model's dtype, ids and labels unchanged."""
    for split in (data.calibration, data.evaluation):
        for batch in split:
            for key, value in batch.items():
                batch[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return data
