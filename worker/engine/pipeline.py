"""The compression pipeline: load, baseline, profile, probe, sensitivity, search, final, onnx, export.

`compress()` is the engine's one entry point; the CLI and the Celery task both call it. Progress goes
to a callback, which may raise `Cancelled` to stop the job at the next step boundary.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from contextlib import contextmanager
from importlib.metadata import version
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import allocator, export, llamacpp
from . import sensitivity as sens
from . import generation
from .adapters import TEXT_GENERATION, adapt, attention_implementation, quantizable_layers
from .data import DataOptions
from .errors import InputError
from .evaluation import Evaluator
from .hardware import Hardware, detect
from .kernels import (INTEGER_FORMATS, LLAMA_CPP, ONNX_RUNTIME, WHOLE_CAST, Backend, LatencyProfile, WholeCast,
                      choose_backend, float_model)
from .kernels.menu import Menu, load_or_measure
from .artifact import model_size_bytes, save_artifact
from .cost import Ledger
from .latency import Latency, LatencyOptions, Paired, Workload, measure, paired
from .plan import FOLDED_GRAPH, GGML_TYPES, Plan
from .report import STATUS_MESSAGES, Baseline, Final, Report
from .search import (DEFAULT_CONFIDENCE, REFINEMENT_STEPS, SELECTIONS, Budget, Measurement, Step, cost_aware_order,
                     frontier_order, max_evaluations, search)
from .sources import load_model
from .spec import parse_source

PHASES = ("load", "baseline", "probe", "profile", "sensitivity", "search", "final", "onnx", "export")

NO_SAVING = "saves no time: its measured saving is nil or negative beyond its noise"
# Below this many test samples the test-split figure is too coarse to lean on.
MIN_TEST_SAMPLES = 50
# A top-1 metric over fewer distinct predicted classes than this (or than the model has) cannot tell plans apart.
MIN_DISTINCT_CLASSES = 5
# The formats a plan chooses among when the request names none: a language model's per layer among three
# (each task's list gains bf16 where the worker's measured menu offers it: menu.Menu.formats_for).
TASK_FORMATS = {TEXT_GENERATION: INTEGER_FORMATS}
BASELINES = ("auto", "fp32", "bf16", "fp16")
# The fewest paired rounds with a 95% distribution-free interval for their median (latency.median_rank).
MIN_DECISION_ROUNDS = 7


@dataclass
class Progress:
    phase: str
    fraction: float  # of the whole job, 0..1
    message: str = ""
    step: int | None = None
    steps: int | None = None
    phases: dict = field(default_factory=dict)  # seconds of each phase finished so far


# Share of the job's progress bar each phase takes (sensitivity and search dominate the time when they run).
PHASE_WEIGHTS = {"load": 0.05, "baseline": 0.05, "probe": 0.05, "profile": 0.1, "sensitivity": 0.25, "search": 0.3,
                 "final": 0.1, "onnx": 0.05, "export": 0.05}


@dataclass
class CompressOptions:
    budget: Budget
    sensitivity: sens.SensitivityOptions = field(default_factory=sens.SensitivityOptions)
    data: DataOptions = field(default_factory=DataOptions)
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    selection: str = "cost-aware"  # how the order trades accuracy cost against measured speed
    exports: tuple[str, ...] = ()  # deployable formats besides the torch artifact: "onnx" (needs out_dir)
    runtime: str = "torch"  # where every plan is evaluated, timed and delivered: torch or onnxruntime
    device: str = "cpu"
    formats: tuple[str, ...] = ()  # the low precisions a plan may use; empty: the task's default (TASK_FORMATS)
    generation_latency: str | None = None  # a language model's timed workload: decode (default) or prefill
    baseline: str = "auto"  # the float execution plans must beat on latency; auto: the worker's fastest (measured)
    threads: int | None = None
    model_root: Path | None = None
    cache_dir: Path = Path("var/cache")
    out_dir: Path | None = None
    # Warm start: an earlier analysis of the same revision and data (see Sensitivity.from_report).
    reuse_sensitivity: sens.Sensitivity | None = None
    revision: str | None = None  # already resolved by the caller (a local folder is hashed once)
    hub_token: bool = False  # whether the Hub may see this process's HF_TOKEN (hub.token_for)

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}")

    @classmethod
    def from_request(cls, request: dict, *, interlayer_weight: float = 0.5, hutchinson_tol: float = 0.1,
                     latency_repeats: int = 15, profile_seconds: float = 0.5, **runtime) -> "CompressOptions":
        """A job request (the API's and the CLI's one vocabulary, already validated) in the engine's terms;
        `runtime` is where and how this process runs it (device, threads, model_root, cache_dir, out_dir)."""
        budget, data, samples = request["budget"], request.get("data") or {}, request["hutchinson_samples"]
        return cls(
            budget=Budget(budget["max_drop"], budget.get("min_drop", 0.0), budget.get("mode", "relative"),
                          budget.get("confidence", DEFAULT_CONFIDENCE)),
            sensitivity=sens.SensitivityOptions(ordering=request["ordering"], interlayer=request["interlayer"],
                                                loss=request.get("analysis_loss", "fidelity"),
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
            runtime=request.get("runtime", "torch"),
            formats=tuple(request.get("precisions") or ()),
            generation_latency=request.get("latency"),
            baseline=request.get("baseline", "auto"),
            **{k: v for k, v in runtime.items() if v is not None},
        )


class _Tracker:
    """Progress per phase, each phase's wall time, and what it spends (the cost ledger)."""

    def __init__(self, callback: Callable[[Progress], None] | None, ledger: Ledger):
        self.callback = callback or (lambda p: None)
        self.ledger = ledger
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
        with self.ledger.phase(name) as spent:
            yield
        self.phases[name] = round(spent.seconds, 3)
        self.report(1.0, f"{name} done in {self.phases[name]:.1f}s")


def _environment(device: str, backend: str, attention: str | None, hardware: Hardware) -> dict:
    import transformers

    return {
        "torch": torch.__version__, "torchao": version("torchao"), "transformers": transformers.__version__,
        "device": device, "threads": torch.get_num_threads(), "cpu": hardware.model_name,
        "hardware": hardware.to_dict(),
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
    workload: Workload  # what one timed call is: the example batch, or a language model's decode step / prefill
    hardware: Hardware
    menu: Menu  # the formats this worker offers, measured
    reference_precision: str  # the float execution plans must beat on latency (fp32, or a whole-model 16-bit cast)

    @property
    def candidates(self) -> list[str]:
        return self.backend.candidates

    @property
    def example(self) -> tuple[torch.Tensor, ...]:
        return self.calibration[0]

    def plan(self, low: list[str]) -> Plan:
        """The plan with the candidates `low` in low precision (a layer named by several items: the last) and
        every other layer in the baseline precision."""
        layers = {n: self.baseline_precision for n in self.backend.layers}
        layers.update(self.backend.assignment(low))
        return Plan(layers=layers, baseline_precision=self.baseline_precision, device=self.device,
                    backend=self.backend.name, source=self.source, revision=self.revision,
                    calibration={"batches": len(self.calibration), "data": self.evaluator.data.description},
                    choices=list(self.backend.formats),
                    weight_only_activations=getattr(self.backend, "activations", "fp32"))

    def build(self, plan: Plan) -> torch.nn.Module:
        return self.backend.build(plan, self.calibration)


def prepare(source: str, options: CompressOptions) -> Workbench:
    """Load the model and its data, put it in the baseline precision and pick the kernel backend."""
    spec = parse_source(source)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda requested but no GPU is available")
    loaded = load_model(spec, options.data, options.model_root, options.cache_dir, options.revision, options.hub_token)
    hardware = detect(options.device)
    menu = load_or_measure(hardware, options.cache_dir)
    baseline_precision = "fp32" if options.device == "cpu" else "fp16"
    adapter = float_model(adapt(loaded.model, loaded.task), baseline_precision, options.device)
    data = _to_device(loaded.data, options.device, next(adapter.parameters()).dtype)
    calibration = [adapter.inputs(batch) for batch in data.calibration]
    generating = loaded.task == TEXT_GENERATION
    if options.generation_latency and not generating:
        raise InputError(f"latency {options.generation_latency} is for causal language models; {source} is "
                         f"{loaded.task}")
    if generating and options.runtime == ONNX_RUNTIME:
        raise InputError("a causal language model's plans run in torch or llama.cpp: its decode loop and KV cache "
                         "are not in the ONNX export")
    if options.runtime == LLAMA_CPP:
        _check_llama_cpp(source, generating, loaded.gguf, options.formats)
    formats = options.formats or (GGML_TYPES if options.runtime == LLAMA_CPP else
                                  TASK_FORMATS.get(loaded.task, ("int8",)))
    # bf16 per layer where the menu offers it, unless the job exports ONNX: onnxruntime's quantizer maps int8
    # Linear layers only, so a plan with a bf16 layer could not be exported.
    if not options.formats and options.runtime == "torch" and "onnx" not in options.exports and _linear_only(adapter):
        formats = menu.formats_for(formats)
    try:
        backend = choose_backend(adapter, options.device, calibration[0], options.runtime, formats,
                                 menu.weight_only_activations if options.device == "cpu" else "fp32",
                                 gguf=loaded.gguf, latency=options.generation_latency or generation.DECODE)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not backend.candidates:
        raise InputError(f"{source} has no layers the {backend.name} backend can quantize")
    backend.fit(calibration)
    if not backend.candidates:  # a measured menu may keep no format (llama.cpp: no type saved time)
        raise InputError(f"no low-precision format of the {backend.name} backend saves time on this worker")
    # Plans are compared against the backend's baseline (the execution mode users deploy), so its outputs are
    # the reference; the analysis compares with the float model its simulation runs in.
    evaluator = Evaluator(backend.baseline, data, loaded.task, loaded.metric, input_names=adapter.input_names,
                          analysis_loss=options.sensitivity.loss, analysed=backend.simulated)
    workload = (generation.workload(options.generation_latency or generation.DECODE, calibration[0]) if generating
                else Workload(calibration[0]))
    reference = menu.fastest_float if options.baseline == "auto" else options.baseline
    if options.runtime != "torch":
        reference = baseline_precision  # a whole-model cast is a torch execution
    return Workbench(str(spec), loaded.revision, loaded.task, adapter, evaluator, backend, calibration,
                     baseline_precision, options.device, workload, hardware, menu, reference)


def _untied_head(bench: Workbench, plan: Plan) -> list[str]:
    """A torch plan that runs a tied output head in another precision than the token embedding gives the head its
    own copy of the table: the artifact grows by that copy, and the report must say why."""
    model = getattr(bench.adapter, "model", None)
    config = getattr(model, "config", None)
    if bench.backend.name.startswith("llama.cpp") or not getattr(config, "tie_word_embeddings", False):
        return []  # in a GGUF the head is the embedding table itself, in one type
    head = next((name for name, module in bench.adapter.named_modules()
                 if module is model.get_output_embeddings()), None)
    precision = plan.layers.get(head)
    if precision is None or precision == plan.baseline_precision:
        return []
    table = model.get_input_embeddings().weight
    return [f"the output head ({head}) shares its weights with the token embedding; in {precision} it needs its own "
            f"copy, so the artifact stores both (the {plan.baseline_precision} table of "
            f"{table.numel() * table.element_size() / 1e6:.1f} MB stays for the embedding lookup)"]


def _check_llama_cpp(source: str, generating: bool, gguf, formats: tuple[str, ...]) -> None:
    """What a search in llama.cpp needs: a causal LM read from a GGUF file (its metadata and tokenizer travel into
    every plan's file), llama-cpp-python, and GGML types as formats."""
    from . import llamacpp

    if not generating or gguf is None:
        raise InputError(f"--runtime llama.cpp takes a causal language model read from a GGUF file "
                         f"(builtin:smollm2-135m, builtin:gemma3-270m); {source} is not one")
    if not llamacpp.available():
        raise InputError("--runtime llama.cpp needs llama-cpp-python, which this worker does not have (make install "
                         "builds it)")
    unknown = [f for f in formats if f not in GGML_TYPES]
    if unknown:
        raise InputError(f"--runtime llama.cpp takes GGML types as precisions ({', '.join(GGML_TYPES)}), not "
                         f"{', '.join(unknown)}")


def _linear_only(adapter: torch.nn.Module) -> bool:
    """Whether every quantizable layer is a Linear (bf16 per layer is a Linear format; conv nets run static int8)."""
    return all(isinstance(m, torch.nn.Linear) for m in quantizable_layers(adapter).values())


def _data_warnings(bench: Workbench) -> list[str]:
    evaluator, data = bench.evaluator, bench.evaluator.data
    warnings = []
    if data.synthetic:
        warnings.append("the metric is measured on synthetic random inputs: it says nothing about real data")
    if data.sizes["test"] < MIN_TEST_SAMPLES:
        warnings.append(f"the test split has only {data.sizes['test']} samples: its metric is coarse")
    if evaluator.metric_name.startswith("top1"):
        classes = evaluator.distinct_predictions("evaluation")
        if classes < min(MIN_DISTINCT_CLASSES, evaluator.classes):
            warnings.append(f"the fp32 model predicts only {classes} distinct class(es) on the evaluation split, "
                            f"so {evaluator.metric_name} can hardly tell plans apart")
    return warnings


def select(analysis: sens.Sensitivity, profile: LatencyProfile, eligible: list[str], options: CompressOptions,
           backend: Backend) -> list[str]:
    """The order the search bisects over. Cost-aware: accuracy cost (the sensitivity score) per millisecond
    the layer saves; sensitivity: the ordering alone. A random ordering has no scores and stays random. With
    several formats per layer, cost-aware is the frontier of upgrades (search.frontier_order)."""
    eligible_set = set(eligible)
    ordering = [n for n in analysis.ordering if n in eligible_set]
    if options.selection == "sensitivity" or options.sensitivity.ordering == "random":
        return ordering
    scores = {layer.name: layer.score for layer in analysis.layers}
    savings = {n: profile.saving(n) for n in ordering}
    if backend.several:
        by_layer: dict[str, list[str]] = {}
        for item in ordering:
            by_layer.setdefault(backend.layer_of(item), []).append(item)
        return frontier_order(by_layer, scores, savings)
    return cost_aware_order(ordering, scores, savings)


def _latency_model(profile: LatencyProfile | None, steps: list) -> dict | None:
    """How the latency model was obtained, and how it fared against every plan the search timed."""
    if profile is None:
        return None
    timed = [s for s in steps if s.latency_ms is not None and s.predicted_latency_ms is not None]
    errors = [abs(s.predicted_latency_ms - s.latency_ms) / s.latency_ms for s in timed]
    return {**profile.to_dict(), "timed_plans": len(timed),
            "median_relative_error": statistics.median(errors) if errors else None}


class Plans:
    """Every plan the search evaluates: built once on the real kernels, scored per sample on the evaluation
    split (so its drop comes with a paired standard error), and kept while it may still be returned."""

    def __init__(self, bench: Workbench, budget: Budget, baseline_scores: list[float]):
        self.bench, self.budget, self.baseline_scores = bench, budget, baseline_scores
        self.models: dict[tuple, torch.nn.Module] = {}

    def evaluate(self, low: list[str]) -> Measurement:
        model = self.models[tuple(low)] = self.bench.build(self.bench.plan(low))
        scores = self.bench.evaluator.scores(model)
        _, stderr = self.budget.paired(self.baseline_scores, scores)
        return Measurement(statistics.fmean(scores), stderr)


def compress(source: str, options: CompressOptions, progress: Callable[[Progress], None] | None = None) -> Report:
    """Run the whole pipeline and return the report (also written to `options.out_dir` if set)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    ledger = Ledger()
    track = _Tracker(progress, ledger)

    with track.phase("load"):
        bench = prepare(source, options)
        evaluator = bench.evaluator
        warnings = [bench.backend.fallback] if bench.backend.fallback else []
        warnings += _data_warnings(bench)
        budget = _budget_for(options.budget, evaluator)
        backend, workload = bench.backend, bench.workload

    with track.phase("baseline"):
        baseline = bench.backend.baseline
        baseline_scores, baseline_test_scores = evaluator.baseline_scores(), evaluator.baseline_scores("test")
        baseline_metric, baseline_test = statistics.fmean(baseline_scores), statistics.fmean(baseline_test_scores)
        baseline_size = model_size_bytes(baseline)
        reference = _reference(bench, budget, baseline_scores, warnings)

    plans = Plans(bench, budget, baseline_scores)
    latencies: dict[tuple, Latency] = {}
    profile: LatencyProfile | None = None
    evaluated = 0

    def on_step(step, low, cap, timed: Latency | None = None):
        nonlocal evaluated
        evaluated += 1
        key = tuple(low)
        step.predicted_latency_ms = profile.predict_ms(backend.effective(low)) if profile else None
        if step.accepted:  # only points within budget can be returned, so only they are timed
            latencies[key] = timed or measure(plans.models[key], workload, options.latency)
            step.latency_ms = latencies[key].median
        else:
            del plans.models[key]
        track.report(evaluated / cap, f"{step.stage} k={step.k}: {evaluator.metric_name} {step.metric:.4f}",
                     step=evaluated, steps=cap)

    def against_baseline(low: tuple) -> Paired:
        """The plan against the baseline in paired, interleaved rounds: drift hits both alike, and the
        reduction comes with its interval."""
        return _timed_pair(baseline, plans.models[low], workload, options)

    def profiled() -> LatencyProfile:
        return backend.profile(bench.calibration, options.latency.profile_seconds, workload)

    candidates = bench.candidates
    if backend.several:  # which format is each layer's fastest is measured before the probe can take it
        with track.phase("profile"):
            profile = profiled()
    # The probe: each layer in its fastest format (the only one, with one format).
    probe_low = profile.fastest(backend.layer_of) if backend.several else candidates
    timing: Paired | None = None  # the final plan against the baseline, once known
    with track.phase("probe"):
        # Before any analysis: within budget and faster, nothing is left to search.
        probe = Step.measured(len(probe_low), plans.evaluate(probe_low), baseline_metric, budget, stage="probe")
        if probe.accepted:
            timing = against_baseline(tuple(probe_low))
        on_step(probe, probe_low, max_evaluations(len(candidates), REFINEMENT_STEPS),
                timed=timing and Latency.of(timing.second_rounds))
        if timing and not timing.reduction().faster:
            timing = None  # perhaps a subset is faster: the profile says which layers save time
    easy = timing is not None

    if not backend.several:
        with track.phase("profile"):
            if not easy:
                profile = profiled()
                probe.predicted_latency_ms = profile.predict_ms(candidates)
    eligible = candidates if easy else [n for n in candidates if profile.measurable(n)]

    with track.phase("sensitivity"):
        reused = options.reuse_sensitivity
        if easy or not eligible:
            why = ("not needed: every candidate in low precision is within budget and faster" if easy else
                   "not needed: no layer saves measurable time")
            analysis = sens.unscored(bench.backend, options.sensitivity.ordering, why)
        elif reused is not None and sorted(reused.ordering) == sorted(candidates):
            analysis = reused
            track.report(1.0, "reused the stored sensitivity analysis")
        else:
            # No name holds the simulation: its low-precision weights (a model's worth per format) are freed
            # before the search loads its plans.
            analysis = sens.analyse(bench.backend.simulation(bench.calibration), evaluator, candidates,
                                    options.sensitivity, bench.adapter, progress=lambda f, m: track.report(f, m))
        warnings += analysis.warnings

    with track.phase("search"):
        steps = [probe]
        result = None
        order = list(probe_low) if easy else select(analysis, profile, eligible, options, backend) if eligible else []
        if order and not easy:
            # The probe is the order's k = L step when the whole order makes the probe's plan; else k = L is new.
            known = probe if backend.assignment(order) == backend.assignment(probe_low) else None
            result = search(order, plans.evaluate, baseline_metric, budget, on_step=on_step, probe=known)
            steps = result.steps if known else [probe, *result.steps]

    with track.phase("final"):
        fastest = tuple(probe_low) if easy else min(latencies, key=lambda key: latencies[key].median) \
            if latencies else ()
        if fastest and timing is None:
            timing = against_baseline(fastest)
        speedup = timing.reduction() if timing else None
        if timing:
            baseline_latency, latencies[fastest] = Latency.of(timing.first_rounds), Latency.of(timing.second_rounds)
        else:  # nothing was timed against it: the baseline alone
            baseline_latency = measure(baseline, workload, options.latency)
        faster = speedup is not None and speedup.faster
        status = ("compressed" if faster else "no_saving" if not eligible else "no_speedup" if latencies
                  else "none_fit")
        final_low = list(fastest) if faster else []
        final_model = plans.models[fastest] if faster else baseline
        final_plan = bench.plan(final_low)
        if reference is not None:
            # The plan (or the baseline it fell back to) against the whole model cast to the worker's fastest
            # float: a user could cast in one line, so a plan that does not beat the cast is not the answer.
            versus_cast = _timed_pair(reference.model, final_model, workload, options).reduction()
            if reference.fits and not versus_cast.faster:
                warnings.append(f"{reference.describe()} is at least as fast as the "
                                + ("fastest plan within budget" if final_low else "baseline")
                                + f" (the plan's reduction against it {versus_cast.median:.1%}, 95% interval "
                                  f"{versus_cast.low:.1%} to {versus_cast.high:.1%}): the cast model is returned")
                status, final_low, final_model = "float_cast", [], reference.model
                final_plan = reference.plan(bench.plan([]))
                timing = _timed_pair(baseline, final_model, workload, options)
                speedup, versus_cast = timing.reduction(), None
                faster = speedup.faster
                baseline_latency, latencies[()] = Latency.of(timing.first_rounds), Latency.of(timing.second_rounds)
            elif not versus_cast.faster:  # a user must know the cast is as fast, even where it cannot be returned
                warnings.append(f"{reference.describe()} is at least as fast as the returned model (its reduction "
                                f"against the cast {versus_cast.median:.1%}, 95% interval {versus_cast.low:.1%} to "
                                f"{versus_cast.high:.1%}); the cast is not returned because it breaks the budget")
        chosen = next((s for s in steps if s.accepted and backend.assignment(
            s.low(order) if s.stage != "probe" else probe_low) == backend.assignment(final_low)), None) \
            if final_low else None
        cast = status == "float_cast"
        # The one look at the test split: no decision above used it.
        test_scores = evaluator.scores(final_model, "test") if final_low or cast else baseline_test_scores
        test_drop, test_stderr = budget.paired(baseline_test_scores, test_scores)
        admitted = reference if cast else chosen
        final = Final(metric=admitted.metric if admitted else baseline_metric,
                      test_metric=statistics.fmean(test_scores),
                      latency_ms=(latencies[() if cast else fastest] if faster else baseline_latency).to_dict(),
                      size_bytes=model_size_bytes(final_model) if final_low or cast else baseline_size,
                      drop=admitted.drop if admitted else 0.0, stderr=admitted.stderr if admitted else 0.0,
                      test_drop=test_drop, test_stderr=test_stderr,
                      test_drop_interval=list(budget.interval(test_drop, test_stderr)), k=len(final_low),
                      accepted_by=f"the {admitted.stage} step k={admitted.k}: drop {admitted.drop:.4f} + z·SE "
                                  f"{budget.z:.2f}·{admitted.stderr:.4f} = {admitted.bound:.4f} <= {budget.max_drop}"
                      if chosen else reference.accepted_by(budget) if cast else None)
        if final_low and not budget.accepts(final.test_drop):
            warnings.append(f"on the test split the plan drops {final.test_drop:.4f} (95% interval "
                            f"{final.test_drop_interval[0]:.4f} to {final.test_drop_interval[1]:.4f}), over the "
                            f"budget of {budget.max_drop} that it meets on the evaluation split ({final.drop:.4f})")
        warnings += _untied_head(bench, final_plan)
        for step in steps:
            step.chosen = step is chosen
        figures = _generation(bench, final_model, options) if bench.task == TEXT_GENERATION else None

    with track.phase("onnx"):
        exports = {}
        if options.runtime == ONNX_RUNTIME:  # the search ran in onnxruntime: its own file is the deliverable
            exports["onnx"] = _runtime_file(bench.backend, final, baseline_latency, speedup, final_plan)
        elif options.runtime == LLAMA_CPP:  # the search ran in llama.cpp: the GGUF is the deliverable
            exports["gguf"] = _gguf_file(bench, final_model, final, options)
        elif "onnx" in options.exports and options.out_dir:
            exports["onnx"] = _onnx(bench, final_plan, final, baseline_metric, options, warnings)

    data = evaluator.data
    layers = quantizable_layers(bench.adapter)
    report = Report(
        source=bench.source, revision=bench.revision, task=bench.task, status=status, message=STATUS_MESSAGES[status],
        warnings=warnings,
        environment=_environment(options.device, bench.backend.name, attention_implementation(bench.adapter),
                                 bench.hardware),
        backend={"name": backend.name, "note": backend.note, "low_precision": "/".join(backend.formats),
                 "formats": list(backend.formats), "runtime": options.runtime,
                 "menu": {"asked": list(options.formats) or None, "offered": list(backend.formats),
                          "floats": list(bench.menu.floats), "fastest_float": bench.menu.fastest_float,
                          "weight_only_activations": bench.menu.weight_only_activations,
                          "reasons": bench.menu.reasons,
                          **({"ggml": backend.menu_report()} if options.runtime == LLAMA_CPP else {})}},
        data={"description": data.description, "synthetic": data.synthetic, **data.sizes,
              "batch_size": options.data.batch_size, "seq_len": options.data.seq_len},
        metric=_metric(evaluator, budget, baseline_metric, baseline_test, final),
        budget={**asdict(budget), "z": budget.z},
        baseline=Baseline(metric=baseline_metric, test_metric=baseline_test, latency_ms=baseline_latency.to_dict(),
                          size_bytes=baseline_size, precision=bench.baseline_precision),
        final=final,
        latency_reduction=speedup.median if faster else 0.0,
        latency={"reduction": speedup.to_dict() if speedup else None,
                 "against": {bench.baseline_precision: speedup.to_dict() if speedup else None,
                             **({reference.precision: versus_cast.to_dict() if versus_cast else None}
                                if reference is not None else {})},
                 "baseline": {"asked": options.baseline, "beaten": bench.reference_precision,
                              "accuracy_against": bench.baseline_precision},
                 "method": "the returned plan (or, if none beat it, the fastest within budget) against the baseline "
                           "in paired, interleaved rounds (order alternating); median over rounds of 1 - "
                           "plan/baseline, its 95% order-statistic (sign test) interval; compressed only when the "
                           "whole interval is above zero"},
        layers=[{**layer.to_dict(), "precision": backend.precision_in(layer.name, final_plan),
                 "latency_saving_ms": profile.saving(layer.name) if profile else None,
                 "saving_noise_ms": profile.savings[layer.name].noise_ms if profile else None,
                 "excluded": None if layer.name in eligible else NO_SAVING}
                for layer in analysis.layers],
        skipped_layers=[{"name": name, "kind": type(layers[name]).__name__, "reason": reason}
                        for name, reason in bench.backend.skipped.items()],
        search={
            "ordering": options.sensitivity.ordering,
            "selection": options.selection,
            "order": order,
            "method": analysis.method,
            "profile": None if profile else "not needed: every candidate in low precision is within budget and "
                                            "faster than the baseline",
            "latency_workload": {"name": workload.name, "unit": workload.unit},
            "acceptance": {"rule": "drop + z * stderr <= max_drop (stderr paired over the evaluation samples)",
                           "confidence": budget.confidence, "z": budget.z},
            "latency_model": _latency_model(profile, steps),
            "evaluations": len(steps),
            "max_evaluations": max_evaluations(len(order), REFINEMENT_STEPS),
            "refinement_evaluations": sum(s.stage == "refinement" for s in steps),
            "best_k": result.best_k if result else len(candidates) if easy else 0,
            "search_status": result.status if result else "all_low" if easy else "no_saving",
            "steps": [asdict(s) for s in steps],
        },
        plan=final_plan,
        exports=exports,
        generation=figures,
    )

    if "gguf" in exports:  # which llama.cpp, on which of its CPU kernel variants, measured every plan
        report.environment["llama_cpp"] = exports["gguf"]["runtime"]

    with track.phase("export"):
        if options.out_dir:
            out = Path(options.out_dir)
            if options.runtime in (ONNX_RUNTIME, LLAMA_CPP):
                files = bench.backend.deliver(final_plan, out / "artifact")
            else:  # the artifact re-applies from plan.json to the original model: a float plan is the original
                files = save_artifact(final_model if final_low or status == "float_cast" else bench.adapter,
                                      final_plan, out / "artifact")
            report.artifact = {name: str(path.relative_to(out)) for name, path in files.items()}
    if hasattr(backend, "close"):  # a backend holding a runtime's models and files (llama.cpp) frees them now
        backend.close()
    report.phases = dict(track.phases)
    report.cost = ledger.to_dict()
    if options.out_dir:
        report.write(Path(options.out_dir) / "report.json")
    return report


@dataclass
class Reference:
    """The whole model cast to a 16-bit float, scored on the evaluation split against the model as given."""

    model: WholeCast
    metric: float
    drop: float
    stderr: float
    fits: bool  # within budget by the same rule as any plan
    cast_of: str  # what its plan re-applies: the model as given, or FOLDED_GRAPH (a conv net's baseline graph)

    @property
    def precision(self) -> str:
        return self.model.precision

    def describe(self) -> str:
        return f"the whole model cast to {self.precision}" + (
            " (the graph the baseline runs: BatchNorm folded, channels-last)" if self.cast_of == FOLDED_GRAPH else "")

    def accepted_by(self, budget: Budget) -> str:
        return (f"{self.describe()}: drop {self.drop:.4f} + z·SE {budget.z:.2f}·{self.stderr:.4f} = "
                f"{budget.bound(self.drop, self.stderr):.4f} <= {budget.max_drop}")

    def plan(self, float_plan: Plan) -> Plan:
        """The plan that re-applies the cast: every layer in the cast's precision, which is the plan's baseline."""
        return Plan(**{**asdict(float_plan), "layers": {n: self.precision for n in float_plan.layers},
                       "baseline_precision": self.precision, "backend": WHOLE_CAST, "cast_of": self.cast_of})


def _reference(bench: Workbench, budget: Budget, baseline_scores: list[float], warnings: list[str]
               ) -> Reference | None:
    """The float execution plans must beat besides the baseline: the worker's fastest native float, cast whole."""
    if bench.reference_precision == bench.baseline_precision:
        return None
    model = WholeCast(bench.backend.baseline, bench.reference_precision)
    scores = bench.evaluator.scores(model)
    drop, stderr = budget.paired(baseline_scores, scores)
    fits = budget.accepts(drop, stderr)
    if not fits:
        warnings.append(f"the whole model cast to {model.precision} drops {drop:.4f} ± {stderr:.4f}, over the budget "
                        f"of {budget.max_drop}: it is timed beside the plan but cannot be the answer")
    return Reference(model, statistics.fmean(scores), drop, stderr, fits, bench.backend.cast_of)


def decision_rounds(options: CompressOptions) -> int:
    """Rounds of a timing that decides "faster": the asked repeats, and never fewer than a 95% interval for a
    median needs (with fewer, nothing could ever be called faster)."""
    return max(options.latency.repeats, MIN_DECISION_ROUNDS)


def _timed_pair(first: torch.nn.Module, second: torch.nn.Module, workload: Workload, options: CompressOptions
                ) -> Paired:
    return paired(workload.call(first), workload.call(second), rounds=decision_rounds(options), inner=1,
                  warmup=options.latency.warmup, samples=workload.samples)


def _budget_for(budget: Budget, evaluator: Evaluator) -> Budget:
    """A language model scored on text has a log-likelihood metric: a relative budget is on its perplexity."""
    if evaluator.generation and evaluator.labelled and budget.mode == "relative":
        return Budget(budget.max_drop, budget.min_drop, "perplexity", budget.confidence)
    return budget


def _metric(evaluator: Evaluator, budget: Budget, baseline: float, baseline_test: float, final: Final) -> dict:
    """The metric's name and direction; a language model's also as perplexity (exp of minus the metric)."""
    figures = {"name": evaluator.metric_name, "labelled": evaluator.labelled, "higher_is_better": True,
               "budget_on": {"perplexity": "relative increase of perplexity", "absolute": "metric points"}.get(
                   budget.mode, "relative drop of the metric")}
    if budget.mode == "perplexity":
        figures["perplexity"] = {"baseline": math.exp(-baseline), "final": math.exp(-final.metric),
                                 "baseline_test": math.exp(-baseline_test), "final_test": math.exp(-final.test_metric)}
    return figures


def _generation(bench: Workbench, model: torch.nn.Module, options: CompressOptions) -> dict:
    """Decode speed and time to first token, each the returned model against the baseline in paired rounds, and
    memory computed from the weights and the KV cache of one prompt."""
    figures = {}
    for kind in generation.GENERATION_LATENCIES:
        workload = generation.workload(kind, bench.calibration[0])
        timing = paired(workload.call(bench.backend.baseline), workload.call(model), rounds=decision_rounds(options),
                        inner=1, warmup=options.latency.warmup, samples=1)
        figures[kind] = {"baseline_ms": timing.first_ms, "plan_ms": timing.second_ms,
                         "reduction": timing.reduction().to_dict()}
    for side in ("baseline", "plan"):
        figures["decode"][f"{side}_tokens_per_second"] = 1000 / figures["decode"][f"{side}_ms"]
    tokens = bench.calibration[0][0].shape[1]
    figures["prefill"]["prompt_tokens"] = tokens
    figures["memory"] = {"weights_bytes": model_size_bytes(model),
                         "kv_cache_bytes": generation.kv_cache_bytes(bench.adapter.model.config, tokens + 1),
                         "method": "computed, not a measured peak: the serialised weights plus the fp32 KV cache of "
                                   "one prompt and one generated token"}
    return figures


def _gguf_file(bench: Workbench, model, final: Final, options: CompressOptions) -> dict:
    """The returned GGUF as llama.cpp runs it: its perplexity on both splits (the test split's used by no decision),
    and its decode speed and time to first token against the same model as an F16 file in llama.cpp and against
    torch fp32, each pair timed in interleaved rounds."""
    import llama_cpp

    backend, evaluator = bench.backend, bench.evaluator
    f16 = backend.model(backend.file({layer: "F16" for layer in backend.layers}))
    figures = {"file": "artifact/model.gguf", "size_bytes": model.size_bytes,
               "tensor_types": dict(sorted(Counter(llamacpp.tensor_types(model.path).values()).items())),
               "perplexity": {"evaluation": math.exp(-final.metric), "test": math.exp(-final.test_metric)},
               "f16_file": {"size_bytes": f16.size_bytes,
                            "perplexity": {split: math.exp(-statistics.fmean(evaluator.scores(f16, split)))
                                           for split in ("evaluation", "test")}},
               "runtime": {"llama_cpp": llama_cpp.__version__, **model.kernels.to_dict(), "threads": model.threads},
               "searched_in": "llama.cpp"}
    for kind in generation.GENERATION_LATENCIES:
        workload = generation.workload(kind, bench.calibration[0])
        figures[kind] = {}
        for name, other in (("f16_file", f16), ("torch_fp32", bench.adapter)):
            timing = paired(workload.call(other), workload.call(model), rounds=decision_rounds(options), inner=1,
                            warmup=options.latency.warmup, samples=1)
            figures[kind][name] = {"other_ms": timing.first_ms, "gguf_ms": timing.second_ms,
                                   "reduction": timing.reduction().to_dict()}
    figures["decode"]["tokens_per_second"] = {name: 1000 / pair["other_ms"] for name, pair in figures["decode"].items()}
    figures["decode"]["tokens_per_second"]["gguf"] = 1000 / figures["decode"]["f16_file"]["gguf_ms"]
    return figures


def _runtime_file(backend, final: Final, baseline_latency: Latency, speedup, plan: Plan) -> dict:
    """The figures of a plan searched in onnxruntime, as the export of a torch plan reports them."""
    if not plan.low_precision_layers:
        return {"error": None, "skipped": "no low-precision plan was returned: the float file is the model"}
    return {"file": f"artifact/{export.QUANTIZED_FILE}", "float_file": f"artifact/{export.FLOAT_FILE}",
            "metric": final.metric, "test_metric": final.test_metric, "drop": final.drop, "test_drop": final.test_drop,
            "latency_ms": {"float": baseline_latency.median, "quantized": final.latency_ms["median"]},
            "latency_reduction": speedup.median, "latency_interval": speedup.to_dict(),
            "int8_layers": len(plan.low_precision_layers), "quantization": export.QUANTIZATION[backend.mode],
            "opset": export.OPSET, "size_bytes": final.size_bytes, "error": None,
            "runtime": {"onnxruntime": export.onnxruntime.__version__, "providers": export.providers(backend.device)[:1]},
            "searched_in": "onnxruntime"}


def _onnx(bench: Workbench, plan: Plan, final: Final, baseline_metric: float, options: CompressOptions,
          warnings: list[str]) -> dict:
    """The plan as ONNX, measured in onnxruntime; what goes wrong there is a warning, not a failed job."""
    if bench.task == TEXT_GENERATION or bench.backend.several:
        return {"error": None, "skipped": "a plan with weight-only or mixed formats, or a language model's decode "
                                          "loop, has no onnxruntime counterpart here: the torch artifact is the model"}
    if not plan.low_precision_layers:
        return {"error": None, "skipped": "no low-precision plan was returned, so there is nothing to quantize"}
    try:
        result = export.export(bench.backend.baseline, list(bench.adapter.input_names), plan, bench.evaluator,
                               bench.calibration, Path(options.out_dir) / "artifact", options.device,
                               options.latency.repeats, bench.backend.onnx_quantization,
                               bench.backend.corrections)
    except export.ExportError as exc:
        warnings.append(f"no ONNX export: {exc}")
        return {"error": str(exc)}
    figures = result.to_dict()
    figures.update(drop=options.budget.drop(baseline_metric, result.quantized.metric),
                   test_drop=options.budget.drop(baseline_metric, result.quantized.test_metric))
    if not options.budget.accepts(figures["drop"]):
        warnings.append(f"in onnxruntime the plan drops {figures['drop']:.4f} on the evaluation split, over the "
                        f"budget of {options.budget.max_drop} that it meets in torch ({final.drop:.4f})")
    interval = result.latency_interval
    if not interval["faster"]:
        warnings.append(f"in onnxruntime the int8 file is not measurably faster than the float file "
                        f"({result.quantized.latency_ms:.2f} vs {result.float.latency_ms:.2f} ms per batch; reduction "
                        f"{interval['median']:.1%}, 95% interval {interval['low']:.1%} to {interval['high']:.1%})")
    return figures


def _to_device(data, device: str, dtype: torch.dtype):
    """Inputs on the model's device; float inputs (pixels) in the model's dtype, ids and labels unchanged."""
    for split in (data.calibration, data.evaluation, data.test):
        for batch in split:
            for key, value in batch.items():
                batch[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return data
