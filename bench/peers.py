"""mixq's search against the searches people use today, on the same model, data, split and kernels.

Methods (every metric from the real int8 kernels on the evaluation split):
- uniform: every candidate layer in low precision.
- nncf-revert (OpenVINO/NNCF accuracy control): start all low; rank layers by the metric gained when each
  is reverted alone; revert in that order until the plan is within budget.
- greedy-damage: rank layers by the damage each does alone; add them in that order, keeping each addition
  that stays within budget.
- greedy-damage-per-mac: the same, ranked by damage per multiply-accumulate (a latency-aware greedy).
- mixq-<ordering>-<selection>: the engine's sensitivity analysis, latency profile and search.

Evaluations count the distinct plans a method measured (the evaluations are cached across methods and
budgets, since a plan's metric is deterministic, but each method is charged for every plan it needed).
Wall time is the time of those evaluations plus the method's own analysis. Final plans are scored once on
the test split; their latencies and the baseline's are timed together in interleaved rounds (medians), so
machine drift hits all alike. Writes bench/results/peers.{json,md}.

    .venv/bin/python bench/peers.py [--models minilm,efficientnet-lite0,digits-resnet,digits-mobilenetv2] [--keep]
"""

from __future__ import annotations

import json
import statistics
import time

from common import ROOT, engine_process, parser, save

engine_process()

import torch  # noqa: E402

from worker.engine import sensitivity as sens  # noqa: E402
from worker.engine.data import DataOptions  # noqa: E402
from worker.engine.kernels import capture_inputs  # noqa: E402
from worker.engine.latency import LatencyOptions, measure  # noqa: E402
from worker.engine.pipeline import CompressOptions, prepare, select  # noqa: E402
from worker.engine.search import Budget, search  # noqa: E402

BUDGETS = (0.005, 0.01, 0.02)
MIXQ = [("augmented", "cost-aware"), ("augmented", "sensitivity"), ("hessian", "cost-aware"),
        ("hessian", "sensitivity"), ("random", "sensitivity")]
DEFAULT = "mixq-augmented-cost-aware"


class Evaluations:
    """Metric of a low-precision set on the evaluation split, cached; each caller keeps its own tally."""

    def __init__(self, bench):
        self.bench = bench
        self.baseline_metric = bench.evaluator.metric(bench.backend.baseline)
        self.metrics: dict[frozenset, float] = {frozenset(): self.baseline_metric}
        self.seconds: dict[frozenset, float] = {frozenset(): 0.0}
        self.last: tuple[frozenset, torch.nn.Module] | None = None  # the model just built, for timing it

    def __call__(self, low, tally: set | None = None) -> float:
        key = frozenset(low)
        if key not in self.metrics:
            started = time.perf_counter()
            self.metrics[key] = self.bench.evaluator.metric(self.model(low))
            self.seconds[key] = time.perf_counter() - started
        if tally is not None:
            tally.add(key)
        return self.metrics[key]

    def model(self, low):
        key = frozenset(low)
        if not key:
            return self.bench.backend.baseline
        if self.last is None or self.last[0] != key:
            self.last = key, self.bench.build(self.bench.plan(list(low), "int8"))
        return self.last[1]


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


def forward_greedy(order, evaluate, baseline, budget, tally) -> list[str]:
    low = []
    for name in order:
        trial = low + [name]
        if budget.accepts(budget.drop(baseline, evaluate(trial, tally))):
            low = trial
    return low


def nncf_revert(names, evaluate, baseline, budget, tally) -> list[str]:
    low = list(names)
    if budget.accepts(budget.drop(baseline, evaluate(low, tally))):
        return low
    gains = {n: evaluate([m for m in names if m != n], tally) for n in names}
    for name in sorted(names, key=lambda n: -gains[n]):
        low.remove(name)
        if budget.accepts(budget.drop(baseline, evaluate(low, tally))):
            return low
    return []


def run_model(model: str, repeats: int) -> dict:
    options = CompressOptions(budget=Budget(0.01), data=DataOptions(), latency=LatencyOptions(warmup=2, repeats=7),
                              cache_dir=ROOT / "var" / "cache")
    bench = prepare(f"builtin:{model}", options)
    evaluator, names = bench.evaluator, bench.candidates
    evaluate = Evaluations(bench)
    baseline = evaluate.baseline_metric
    print(f"{model}: {len(names)} candidates, baseline {evaluator.metric_name} {baseline:.4f}", flush=True)

    # Shared analyses, each timed once and charged to every method that uses it.
    started = time.perf_counter()
    damage_tally: set = set()
    damage = {n: baseline - evaluate([n], damage_tally) for n in names}
    damage_seconds = time.perf_counter() - started
    layer_macs = macs(bench)
    analyses, analysis_seconds = {}, {}
    simulation = bench.backend.simulation(bench.calibration)
    for ordering in {o for o, _ in MIXQ}:
        started = time.perf_counter()
        analyses[ordering] = sens.analyse(simulation, evaluator, names, sens.SensitivityOptions(ordering=ordering),
                                          bench.adapter)
        analysis_seconds[ordering] = time.perf_counter() - started
    started = time.perf_counter()
    profile = bench.backend.profile(bench.calibration)
    profile_seconds = time.perf_counter() - started
    eligible = [n for n in names if profile.measurable(n)]

    runs = []
    for max_drop in BUDGETS:
        budget = Budget(max_drop)

        def record(method, low, tally, extra_seconds, extra=None):
            seconds = extra_seconds + sum(evaluate.seconds[k] for k in tally)
            metric = evaluate(low)
            runs.append({"model": model, "budget": max_drop, "method": method, "low": sorted(low), "k": len(low),
                         "metric": metric, "drop": budget.drop(baseline, metric), "evaluations": len(tally),
                         "wall_seconds": round(seconds, 1), **(extra or {})})

        tally: set = set()
        evaluate(names, tally)
        record("uniform", list(names), tally, 0.0)
        tally = set()
        record("nncf-revert", nncf_revert(names, evaluate, baseline, budget, tally), tally, 0.0)
        for method, key in (("greedy-damage", lambda n: damage[n]),
                            ("greedy-damage-per-mac", lambda n: damage[n] / layer_macs[n])):
            tally = set(damage_tally)
            record(method, forward_greedy(sorted(names, key=key), evaluate, baseline, budget, tally), tally,
                   damage_seconds - sum(evaluate.seconds[k] for k in damage_tally))
        for ordering, selection in MIXQ:
            options.selection, options.sensitivity.ordering, options.budget = selection, ordering, budget
            order = select(analyses[ordering], profile, eligible, options)
            tally, timings, timing_seconds = set(), {}, []

            def on_step(step, low, _cap, timings=timings, timing_seconds=timing_seconds):
                if step.accepted:  # mixq times what passes and returns the fastest
                    started = time.perf_counter()
                    timings[tuple(low)] = measure(evaluate.model(low), bench.example, options.latency).median
                    timing_seconds.append(time.perf_counter() - started)

            result = search(order, lambda low: evaluate(low, tally), baseline, budget, on_step=on_step)
            low = list(min(timings, key=timings.get)) if timings else []
            record(f"mixq-{ordering}-{selection}", low, tally,
                   analysis_seconds[ordering] + profile_seconds + sum(timing_seconds),
                   {"refinement_evaluations": sum(s.stage == "refinement" for s in result.steps)})
        print(f"  budget {max_drop}: done", flush=True)

    # One look at the test split per distinct plan, and latencies timed together in interleaved rounds.
    plans = {frozenset(r["low"]) for r in runs} | {frozenset()}
    models = {plan: evaluate.model(plan) for plan in plans}
    test = {plan: evaluator.metric(built, "test") for plan, built in models.items()}
    times: dict[frozenset, list[float]] = {plan: [] for plan in plans}
    for _ in range(repeats):
        for plan, built in models.items():
            times[plan].append(measure(built, bench.example, LatencyOptions(warmup=1, repeats=3)).median)
    latency = {plan: statistics.median(values) for plan, values in times.items()}
    base_test = test[frozenset()]
    for r in runs:
        plan = frozenset(r["low"])
        r["test_metric"] = test[plan]
        r["test_drop"] = Budget(r["budget"]).drop(base_test, test[plan])
        r["within_budget"] = Budget(r["budget"]).accepts(r["drop"])
        r["within_budget_on_test"] = Budget(r["budget"]).accepts(r["test_drop"])
        r["latency_ms"] = latency[plan]
        r["latency_reduction"] = 1 - latency[plan] / latency[frozenset()]
    return {"model": model, "candidates": len(names), "metric": evaluator.metric_name, "baseline_metric": baseline,
            "baseline_test_metric": base_test, "baseline_latency_ms": latency[frozenset()],
            "backend": bench.backend.name, "profile": profile.to_dict(), "runs": runs}


def markdown(results: list[dict]) -> str:
    lines = ["| model | budget | method | low layers | metric eval (test) | within budget eval / test "
             "| latency reduction | evaluations | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for r in result["runs"]:
            name = f"**{r['method']}**" if r["method"] == DEFAULT else r["method"]
            lines.append(
                f"| {result['model']} | {r['budget']:.1%} | {name} | {r['k']}/{result['candidates']} "
                f"| {r['metric']:.4f} ({r['test_metric']:.4f}) "
                f"| {'yes' if r['within_budget'] else 'no'} / {'yes' if r['within_budget_on_test'] else 'no'} "
                f"| {r['latency_reduction']:.1%} | {r['evaluations']} | {r['wall_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    arguments = parser(__doc__, "minilm,efficientnet-lite0,digits-resnet,digits-mobilenetv2")
    arguments.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds of the final plans")
    arguments.add_argument("--keep", action="store_true",
                           help="keep the committed results of models not re-run (each model's run is self-contained)")
    args = arguments.parse_args()
    models = args.models.split(",")
    stored = args.out / "peers.json"
    results = [r for r in json.loads(stored.read_text()) if r["model"] not in models] if args.keep else []
    for model in models:
        results.append(run_model(model, args.rounds))
        save(args.out, "peers", results, markdown(results))


if __name__ == "__main__":
    main()
