"""mixq against the searches people use, on the same model, data splits, budget and kernels.

Methods:
- uniform: every candidate layer in int8.
- nncf-revert: OpenVINO/NNCF's accuracy-control idea re-implemented on torch's kernels: start all int8, rank
  layers by the metric regained when each alone is reverted, revert in that order until within budget.
- greedy-damage-per-mac: rank layers by the damage each does alone per multiply-accumulate (a latency-aware
  greedy); add them in that order, keeping each addition that stays within budget.
- mixq (default): the shipped pipeline, `compress()`, with its default options; its cost is its own report's.
- mixq-hessian-cost-aware, mixq-random: the pipeline's steps (probe, profile, analysis, search) with the
  Hessian-only ordering and a random ordering (the control), on the same cached evaluations.
- NNCF 3.4 (real): `nncf.quantize_with_accuracy_control` on the ONNX export of the same float model
  (bench/nncf_peer.py), with its default preset and with per-tensor activations, each capped at `--nncf-cap`
  seconds (a capped run's row says so and has no model).

The re-implemented peers accept a plan on its evaluation drop alone, as they do; mixq accepts with its
confidence rule. Every plan is scored on the evaluation split (cached: a plan's scores are deterministic;
each method is charged for every plan it needed: forward passes, seconds), once on the test split (drop
with its paired standard error), and timed against the float baseline in round-robin rounds (all plans and
the baseline in each round, so drift hits all alike; median reduction with its order-statistic interval). mixq's
plan is also exported and measured in onnxruntime. Writes bench/results/peers.{json,md} (the README's table).
Each model's result names the machine it was measured on: with --keep, results from different machines are
tabled apart, each under its own hardware line.

    .venv/bin/python bench/peers.py [--models minilm,minilm-sentiment,efficientnet-lite0,efficientnet-lite1,
                                     efficientnet-lite2]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import (INT8, SMOKE, PlanScores, ROOT, budgets, data_for, engine_process, kept, parser,
                    provenance, save_by_machine)

engine_process()

import torch  # noqa: E402

import nncf_peer  # noqa: E402
from worker.engine import export  # noqa: E402
from worker.engine import sensitivity as sens  # noqa: E402
from worker.engine.cost import Spent  # noqa: E402
from worker.engine.kernels import WholeCast, capture_inputs  # noqa: E402
from worker.engine.latency import LatencyOptions, Paired  # noqa: E402
from worker.engine.pipeline import CompressOptions, compress, prepare, select  # noqa: E402
from worker.engine.search import Budget, Measurement, Step, search  # noqa: E402

BUDGETS = {"minilm": (0.005, 0.01, 0.02), "minilm-sentiment": (0.005, 0.01), "efficientnet": (0.0025, 0.005, 0.01)}
SIZES = {"minilm": dict(calibration_samples=128, eval_samples=256, test_samples=188),
         "minilm-sentiment": dict(calibration_samples=128, eval_samples=512, test_samples=512),
         "efficientnet": dict(calibration_samples=128, eval_samples=512, test_samples=360)}
VARIANTS = {"mixq-hessian-cost-aware": ("hessian", "cost-aware"), "mixq-random": ("random", "sensitivity")}
DEFAULT = "mixq"
# The phases of a mixq job that decide its plan (load and baseline are what every method starts from).
MIXQ_PHASES = ("probe", "profile", "sensitivity", "search", "final")


def macs(bench) -> dict[str, float]:
    """Multiply-accumulates of each candidate on one batch: weight elements times output positions."""
    inputs = capture_inputs(bench.backend.baseline, bench.candidates, bench.example)
    modules = dict(bench.backend.baseline.named_modules())
    out = {}
    for name in bench.candidates:
        module = modules[name]
        with torch.inference_mode():
            y = module(*inputs[name])
        weight = module.weight if hasattr(module, "weight") else module[0].weight
        out[name] = float(weight.numel() * (y.numel() / y.shape[1] if y.dim() > 2 else y.shape[0]))
    return out


def forward_greedy(order, accepts, tally) -> list[str]:
    low = []
    for name in order:
        if accepts(low + [name], tally):
            low = low + [name]
    return low


def nncf_revert(names, accepts, regained, tally) -> list[str]:
    low = list(names)
    if accepts(low, tally):
        return low
    for name in sorted(names, key=lambda n: -regained[n]):
        low.remove(name)
        if accepts(low, tally):
            return low
    return []


def runtime_figures(report) -> dict:
    """A plan that lives in onnxruntime, as the rows here report it (the job scored its test split once)."""
    budget = Budget(report.budget["max_drop"], confidence=0.5)
    final = report.final
    return {"metric": final.metric, "test_metric": final.test_metric, "drop": final.drop, "stderr": final.stderr,
            "test_drop": final.test_drop, "test_stderr": final.test_stderr,
            "within_budget": budget.accepts(final.drop), "within_budget_on_test": budget.accepts(final.test_drop),
            "ort": {"ms": {"float": report.baseline.latency_ms["median"], "int8": final.latency_ms["median"]},
                    "reduction": report.latency["reduction"]}}


def ort_uniform(bench, float_path: Path, path: Path, max_drop: float, rounds: int) -> dict:
    """onnxruntime's own quantizer on every candidate (its uniform int8 file), measured in onnxruntime."""
    names, evaluator = list(bench.adapter.input_names), bench.evaluator
    plan = bench.plan(bench.candidates)
    started = time.perf_counter()
    export.quantize(float_path, path, plan, __import__("onnx").load(str(float_path)).graph, names, bench.calibration,
                    bench.backend.onnx_quantization)
    seconds = time.perf_counter() - started
    threads = torch.get_num_threads()
    float_model, int8_model = (export.OrtModel(p, names, ["CPUExecutionProvider"], threads) for p in (float_path, path))
    budget = Budget(max_drop, confidence=0.5)
    base, base_test = evaluator.scores(float_model), evaluator.scores(float_model, "test")
    scores, test = evaluator.scores(int8_model), evaluator.scores(int8_model, "test")
    drop, stderr = budget.paired(base, scores)
    test_drop, test_stderr = budget.paired(base_test, test)
    timing = Paired(0, 0, 0, 0, *round_robin({0: float_model, 1: int8_model}, bench.example, rounds).values())
    return {"model": bench.source.removeprefix("builtin:"), "budget": max_drop, "method": "onnxruntime uniform",
            "k": len(bench.candidates), "metric": sum(scores) / len(scores), "test_metric": sum(test) / len(test),
            "drop": drop, "stderr": stderr, "test_drop": test_drop, "test_stderr": test_stderr,
            "within_budget": budget.accepts(drop), "within_budget_on_test": budget.accepts(test_drop),
            "ort": {"ms": {"float": sorted(timing.first_rounds)[rounds // 2], "int8": sorted(timing.second_rounds)[rounds // 2]},
                    "reduction": timing.reduction().to_dict()},
            "cost": {"seconds": round(seconds, 1), "forward": len(base) + len(scores), "evaluations": 1}}


def round_robin(models: dict, example, rounds: int) -> dict:
    """Each model's time per call, `rounds` times, every model once per round (baseline first)."""
    times = {key: [] for key in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(*example)
        for _ in range(rounds):
            for key, model in models.items():
                started = time.perf_counter()
                model(*example)
                times[key].append((time.perf_counter() - started) * 1000)
    return times


def spent_dict(spent: Spent, evaluations: int) -> dict:
    return {**spent.to_dict(), "evaluations": evaluations}


def run_model(model: str, imagenet, rounds: int, budgets: tuple[float, ...] | None, nncf_cap: float) -> dict:
    family = "efficientnet" if model.startswith("efficientnet") else model
    data, root = data_for(model, imagenet, **SIZES[family])
    cache_dir = ROOT / "var" / "cache"
    # int8 throughout, whatever else this CPU's menu offers: every peer here is an int8 method.
    options = CompressOptions(budget=Budget(0.01), data=data, model_root=root, cache_dir=cache_dir,
                              latency=LatencyOptions(warmup=2, repeats=15), formats=INT8)
    bench = prepare(f"builtin:{model}", options)
    evaluator, names = bench.evaluator, bench.candidates
    plans = PlanScores(bench)
    baseline_scores = plans(())
    baseline_metric = sum(baseline_scores) / len(baseline_scores)
    print(f"{model}: {len(names)} candidates, baseline {evaluator.metric_name} {baseline_metric:.4f}", flush=True)

    def measured(low, budget: Budget, tally) -> Measurement:
        scores = plans(low, tally)
        _, stderr = budget.paired(baseline_scores, scores)
        return Measurement(sum(scores) / len(scores), stderr)

    def accepts_by_drop(budget):
        def accepts(low, tally):
            return budget.accepts(budget.drop(baseline_metric, measured(low, budget, tally).metric))
        return accepts

    # Shared analyses, each charged to every method that uses it.
    damage_tally: set = set()
    damage = {n: baseline_metric - measured([n], Budget(0.01), damage_tally).metric for n in names}
    layer_macs = macs(bench)
    regained_tally: set = set()
    regained = {n: measured([m for m in names if m != n], Budget(0.01), regained_tally).metric for n in names}
    started = time.perf_counter()
    profile = bench.backend.profile(bench.calibration)
    profile_seconds = time.perf_counter() - started
    eligible = [n for n in names if profile.measurable(n)]
    analyses, analysis_spent = {}, {}
    simulation = bench.backend.simulation(bench.calibration)
    for variant, (ordering, _) in VARIANTS.items():
        with plans.ledger.phase(f"analysis {ordering}") as spent:
            analyses[ordering] = sens.analyse(simulation, evaluator, names, sens.SensitivityOptions(ordering=ordering),
                                              bench.adapter)
        analysis_spent[ordering] = spent

    runs = []
    for max_drop in budgets or BUDGETS[family]:
        peer_budget = Budget(max_drop, confidence=0.5)  # the peers accept on the drop alone

        def record(method, low, spent: Spent, evaluations: int, **extra):
            runs.append({"model": model, "budget": max_drop, "method": method, "low": sorted(low), "k": len(low),
                         "cost": spent_dict(spent, evaluations), **extra})

        tally: set = set()
        accepts_by_drop(peer_budget)(names, tally)
        record("uniform", names, plans.charge(tally), len(tally))
        tally = set(regained_tally)
        low = nncf_revert(names, accepts_by_drop(peer_budget), regained, tally)
        record("nncf-revert", low, plans.charge(tally), len(tally))
        tally = set(damage_tally)
        order = sorted(names, key=lambda n: damage[n] / layer_macs[n])
        low = forward_greedy(order, accepts_by_drop(peer_budget), tally)
        record("greedy-damage-per-mac", low, plans.charge(tally), len(tally))

        # mixq as shipped: its own process of deciding, with its own cost ledger.
        job = CompressOptions(budget=Budget(max_drop), data=data, model_root=root, cache_dir=cache_dir,
                              latency=LatencyOptions(warmup=2, repeats=15), formats=INT8)
        started = time.perf_counter()
        report = compress(f"builtin:{model}", job)
        wall = time.perf_counter() - started
        spent = Spent()
        for phase in MIXQ_PHASES:
            spent.add(Spent(**report.cost["phases"][phase]))
        # A job may return the whole model cast to 16-bit floats (status float_cast): that model is scored and
        # timed below, not the baseline that its plan's empty low-precision list would name.
        cast = {"cast": report.plan.baseline_precision} if report.status == "float_cast" else {}
        record(DEFAULT, report.plan.low_precision_layers if not cast else [], spent, report.search["evaluations"],
               status=report.status, job_wall_seconds=round(wall, 1), accepted_by=report.final.accepted_by,
               drop_reported=report.final.drop, stderr_reported=report.final.stderr, **cast)
        mixq_row = runs[-1]

        # The pipeline's decisions with other orderings, on the cached evaluations.
        mixq_budget = Budget(max_drop)
        for variant, (ordering, selection) in VARIANTS.items():
            tally = set()
            probe_measure = measured(names, mixq_budget, tally)
            probe = Step.measured(len(names), probe_measure, baseline_metric, mixq_budget, stage="probe")
            extra = Spent()
            if probe.accepted:
                low = list(names)
            else:
                options.sensitivity.ordering, options.selection = ordering, selection
                order = select(analyses[ordering], profile, eligible, options, bench.backend)
                known = probe if len(order) == len(names) else None
                result = search(order, lambda low: measured(low, mixq_budget, tally), baseline_metric, mixq_budget,
                                probe=known)
                passing = [s.low(order) for s in result.steps if s.accepted and s.stage != "probe"]
                low = min(passing, key=profile.predict_ms) if passing else []
                extra.add(analysis_spent[ordering])
                extra.seconds += profile_seconds
            spent = plans.charge(tally)
            spent.add(extra)
            record(variant, low, spent, len(tally))

        # The real NNCF on the ONNX export of the same float model.
        with tempfile.TemporaryDirectory() as folder:
            float_path = Path(folder) / "model.float.onnx"
            export.export_float(bench.backend.baseline, list(bench.adapter.input_names), bench.example, float_path)
            for per_tensor in (True, False):
                figures = nncf_peer.run(bench, Budget(max_drop, confidence=0.5), float_path, rounds, per_tensor,
                                        transformer=family != "efficientnet", cap_seconds=nncf_cap)
                name = "nncf-real (per-tensor activations)" if per_tensor else "nncf-real (default preset)"
                runs.append({"model": model, "budget": max_drop, "method": name, "nncf": figures,
                             "k": figures.get("int8_layers"),
                             "cost": {"seconds": figures["wall_seconds"], "forward": figures["validation_samples"],
                                      "evaluations": figures["validation_calls"]}})
            # mixq's plan in onnxruntime, quantized by onnxruntime's own tooling.
            plan = report.plan
            if plan.low_precision_layers:
                exported = export.export(bench.backend.baseline, list(bench.adapter.input_names), plan, evaluator,
                                         bench.calibration, Path(folder) / "mixq", "cpu", rounds,
                                         bench.backend.onnx_quantization, bench.backend.corrections)
                mixq_row["onnx"] = {"ms": {"float": exported.float.latency_ms, "int8": exported.quantized.latency_ms},
                                    "reduction": exported.latency_interval, "metric": exported.quantized.metric,
                                    "test_metric": exported.quantized.test_metric}
            runs.append(ort_uniform(bench, float_path, Path(folder) / "uniform.onnx", max_drop, rounds))
        if family == "efficientnet":  # conv nets: mixq's torch plan in onnxruntime is the row above
            print(f"  budget {max_drop}: done", flush=True)
            continue
        if SMOKE:
            # A search in onnxruntime profiles through one file per layer (4-5 s each in onnxruntime's quantizer on
            # an AVX2 EPYC): over ten minutes, for a run that must take seconds. tests/test_runtime.py runs it.
            print(f"  budget {max_drop}: done (smoke: no search in onnxruntime)", flush=True)
            continue
        # mixq searching in onnxruntime itself: every evaluation and timing there.
        job.runtime = "onnxruntime"
        started = time.perf_counter()
        ort = compress(f"builtin:{model}", job)
        spent = Spent()
        for phase in MIXQ_PHASES:
            spent.add(Spent(**ort.cost["phases"][phase]))
        runs.append({"model": model, "budget": max_drop, "method": f"{DEFAULT} (runtime onnxruntime)",
                     "k": ort.final.k, "status": ort.status, "job_wall_seconds": round(time.perf_counter() - started, 1),
                     "cost": spent_dict(spent, ort.search["evaluations"]), **runtime_figures(ort)})
        print(f"  budget {max_drop}: done", flush=True)

    # One look at the test split per distinct plan, and latencies in round-robin rounds.
    torch_runs = [r for r in runs if "low" in r]  # plans run on torch's kernels (the others carry their own figures)
    distinct = sorted({frozenset(r["low"]) for r in torch_runs}, key=len)
    casts = {_key(r): WholeCast(bench.backend.baseline, r["cast"]) for r in torch_runs if "cast" in r}
    models = {frozenset(): bench.backend.baseline, **{p: bench.build(bench.plan(sorted(p)))
                                                      for p in distinct if p}, **casts}
    test = {plan: evaluator.scores(built, "test") for plan, built in models.items()}
    # A cast returned at several budgets is the same model: scored on the evaluation split once.
    cast_scores = {key: evaluator.scores(built) for key, built in casts.items()}
    times = round_robin(models, bench.example, rounds)
    base_test = test[frozenset()]
    for r in torch_runs:
        plan, budget = _key(r), Budget(r["budget"], confidence=0.5)
        # mixq's own job decides on its own evaluations: its plan need not be one a peer scored here, so it is
        # scored now (charged to no method: the job's ledger already holds what mixq spent).
        scores = cast_scores[plan] if "cast" in r else plans(plan)
        r["metric"] = sum(scores) / len(scores)
        r["drop"], r["stderr"] = budget.paired(baseline_scores, scores)
        r["test_metric"] = sum(test[plan]) / len(test[plan])
        r["test_drop"], r["test_stderr"] = budget.paired(base_test, test[plan])
        r["within_budget"] = r["drop"] <= r["budget"]
        r["within_budget_on_test"] = r["test_drop"] <= r["budget"]
        reduction = Paired(0, 0, 0, 0, times[frozenset()], times[plan]).reduction()
        r["latency_ms"] = {"baseline": sorted(times[frozenset()])[rounds // 2], "plan": sorted(times[plan])[rounds // 2]}
        r["latency_reduction"] = reduction.to_dict()
    for r in runs:
        if "nncf" in r and "capped" not in r["nncf"]:
            figures = r["nncf"]
            r.update(metric=figures["metric"], test_metric=figures["test_metric"], drop=figures["drop"],
                     stderr=figures["stderr"], test_drop=figures["test_drop"], test_stderr=figures["test_stderr"],
                     within_budget=figures["within_budget"], within_budget_on_test=figures["within_budget_on_test"])
    return {"model": model, "candidates": len(names), "metric": evaluator.metric_name, "backend": bench.backend.name,
            "baseline_metric": baseline_metric, "baseline_test_metric": sum(base_test) / len(base_test),
            "sizes": evaluator.data.sizes, "profile": profile.to_dict(), "runs": runs,
            "provenance": provenance()}


def _key(run: dict):
    """What a torch run returned: its set of int8 layers, or the whole model cast to a 16-bit float."""
    return ("cast", run["cast"]) if "cast" in run else frozenset(run["low"])


def _interval(reduction: dict) -> str:
    return f"{reduction['median']:.1%} [{reduction['low']:.1%}, {reduction['high']:.1%}]"


def _row(result: dict, r: dict) -> str:
    name = f"**{r['method']}**" if r["method"] == DEFAULT else r["method"]
    cost = r["cost"]
    if "capped" in r.get("nncf", {}):
        capped = f"capped at {r['nncf']['capped']:.0f} s: no model"
        return (f"| {result['model']} | {r['budget']:.2%} | {name} | – | {capped} | – | – | – "
                f"| {cost['evaluations']} | {cost['forward']:,} | {cost['seconds']:.0f} |")
    within = f"{'yes' if r['within_budget'] else 'no'} / {'yes' if r['within_budget_on_test'] else 'no'}"
    metric = f"{r['metric']:.4f} ({r['test_metric']:.4f} ± {r['test_stderr'] * abs(result['baseline_test_metric']):.4f})"
    if "nncf" in r:
        torch_side = "–"
        ort = _interval(r["nncf"]["ort_reduction"])
    elif "ort" in r:
        torch_side = "–"
        ort = _interval(r["ort"]["reduction"]) if r["ort"]["reduction"] else "–"
    else:
        torch_side = _interval(r["latency_reduction"])
        ort = _interval(r["onnx"]["reduction"]) if "onnx" in r else "–"
    passes = f"{cost.get('forward', 0):,}" + (f" + {cost['simulated']:,} sim" if cost.get("simulated") else "")
    layers = f"none: all {r['cast']} (cast)" if "cast" in r else f"{r['k']}/{result['candidates']}"
    return (f"| {result['model']} | {r['budget']:.2%} | {name} | {layers} | {metric} | {within} "
            f"| {torch_side} | {ort} | {cost.get('evaluations', '–')} | {passes} | {cost['seconds']:.0f} |")


HEADER = ["| model | budget | method | int8 layers | metric eval (test ± SE) | within budget eval / test "
          "| torch latency reduction [95% interval] | onnxruntime reduction | evaluations | forward samples "
          "| seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]


def markdown(results: list[dict]) -> str:
    return "\n".join([*HEADER, *(_row(result, r) for result in results for r in result["runs"])]) + "\n"


def main() -> None:
    arguments = parser(__doc__, "minilm,minilm-sentiment,efficientnet-lite0,efficientnet-lite1,efficientnet-lite2")
    arguments.add_argument("--rounds", type=int, default=15, help="round-robin timing rounds of the final plans")
    arguments.add_argument("--budgets", type=budgets, default=None,
                           help="comma-separated budgets instead of each model's own (BUDGETS)")
    arguments.add_argument("--nncf-cap", type=float, default=1800,
                           help="seconds each real NNCF run may take before it is stopped and reported as capped")
    args = arguments.parse_args()
    results = kept(args, "peers", lambda result: result["model"])
    for model in args.models.split(","):
        results.append(run_model(model, args.imagenet, args.rounds, args.budgets, args.nncf_cap))
        save_by_machine(args.out, "peers", results, markdown)


if __name__ == "__main__":
    main()
