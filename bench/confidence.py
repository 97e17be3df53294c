"""Do plans accepted within a budget stay within it on data the search never saw, and at what confidence?

For each model the calibration split feeds the latency profile and the sensitivity analysis once, so the
order the search walks is fixed; every other sample forms a pool. Each plan the searches visit is scored
once per sample on the whole pool. Then, many times over, the pool is split at random into an evaluation
part (the size a job uses) and an unseen part (the rest); the pipeline's decisions run on the evaluation
part at each confidence (the probe of every candidate, then the search over the order); the plan returned
(the fastest accepted by the latency model, as the pipeline returns the fastest measured) is scored on the
unseen part. Reported per confidence: how often that plan is within budget on the unseen part, and the
mean number of low-precision layers and predicted latency reduction it buys. Writes
bench/results/confidence.{json,md}; docs/method.md sets the default confidence from it.

    .venv/bin/python bench/confidence.py [--models minilm,efficientnet-lite0] [--resamples 200]
"""

from __future__ import annotations

import random
import statistics

from common import INT8, PlanScores, data_for, engine_process, parser, save

engine_process()

from worker.engine import sensitivity as sens  # noqa: E402
from worker.engine.pipeline import CompressOptions, prepare, select  # noqa: E402
from worker.engine.search import Budget, Measurement, Step, search  # noqa: E402

CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
BUDGETS = {"minilm": (0.005, 0.01, 0.02), "efficientnet": (0.0025, 0.005, 0.01)}
SIZES = {"minilm": (128, 256), "efficientnet": (128, 512)}  # calibration, evaluation samples of a job


def available(model: str, imagenet) -> int:
    """How many samples the model's benchmark data has."""
    if model.startswith("efficientnet"):
        return sum(1 for folder in imagenet.iterdir() for _ in folder.iterdir())
    from worker.engine.builtins import documentation_sentences, sentences

    return len(sentences()) + len(documentation_sentences())


def run_model(model: str, imagenet, resamples: int, cache_dir) -> dict:
    family = "efficientnet" if model.startswith("efficientnet") else model
    calibration, evaluation = SIZES[family]
    # Everything after calibration goes into the pool (the test split keeps one sample: it must not be empty).
    data, root = data_for(model, imagenet, calibration_samples=calibration,
                          eval_samples=available(model, imagenet) - calibration - 1, test_samples=1)
    options = CompressOptions(budget=Budget(0.01), data=data, model_root=root, cache_dir=cache_dir,
                              formats=INT8)  # int8 plans, whatever else this CPU's menu offers
    bench = prepare(f"builtin:{model}", options)
    plans = PlanScores(bench)
    baseline = plans(())
    pool = len(baseline)
    evaluation = min(evaluation, pool // 2)  # some samples are always left unseen (a small pool: --smoke)
    profile = bench.backend.profile(bench.calibration)
    candidates = bench.candidates
    eligible = [n for n in candidates if profile.measurable(n)]
    analysis = sens.analyse(bench.backend.simulation(bench.calibration), bench.evaluator, candidates,
                            options.sensitivity, bench.adapter)
    order = select(analysis, profile, eligible, options, bench.backend)
    print(f"{model}: pool {pool}, {len(candidates)} candidates, {len(order)} eligible", flush=True)
    rng = random.Random(0)
    splits = [rng.sample(range(pool), pool) for _ in range(resamples)]
    rows = []
    for max_drop in BUDGETS[family]:
        for confidence in CONFIDENCES:
            budget = Budget(max_drop, confidence=confidence)
            held, ks, reductions = [], [], []
            for permutation in splits:
                seen, unseen = permutation[:evaluation], permutation[evaluation:]

                def measured(low, part=seen):
                    scores = plans(low)
                    drop, stderr = budget.paired([baseline[i] for i in part], [scores[i] for i in part])
                    return Measurement(statistics.fmean(scores[i] for i in part), stderr)

                base = statistics.fmean(baseline[i] for i in seen)
                probe = Step.measured(len(candidates), measured(candidates), base, budget, stage="probe")
                if probe.accepted:
                    chosen = list(candidates)
                else:
                    known = probe if len(order) == len(candidates) else None
                    result = search(order, measured, base, budget, probe=known)
                    passing = [s.low(order) for s in result.steps if s.accepted and s.stage != "probe"]
                    chosen = min(passing, key=profile.predict_ms) if passing else []
                scores = plans(chosen)
                drop, _ = budget.paired([baseline[i] for i in unseen], [scores[i] for i in unseen])
                held.append(drop <= max_drop)
                ks.append(len(chosen))
                reductions.append(1 - profile.predict_ms(chosen) / profile.baseline_ms)
            rows.append({"model": model, "budget": max_drop, "confidence": confidence, "z": budget.z,
                         "held_on_unseen": statistics.fmean(held), "mean_k": statistics.fmean(ks),
                         "mean_predicted_reduction": statistics.fmean(reductions), "resamples": resamples})
            print(f"  budget {max_drop}, confidence {confidence}: held {rows[-1]['held_on_unseen']:.0%}, "
                  f"k {rows[-1]['mean_k']:.1f}", flush=True)
    return {"model": model, "metric": bench.evaluator.metric_name, "pool": pool, "evaluation": evaluation,
            "unseen": pool - evaluation, "candidates": len(candidates), "plans_scored": len(plans.scores),
            "rows": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| model (metric; evaluation / unseen samples) | budget | " + " | ".join(
        f"confidence {c}" for c in CONFIDENCES) + " |", "|---|---|" + "---|" * len(CONFIDENCES)]
    for result in results:
        for max_drop in sorted({r["budget"] for r in result["rows"]}):
            cells = [f"{r['held_on_unseen']:.0%} (k {r['mean_k']:.1f}, {r['mean_predicted_reduction']:.0%})"
                     for r in result["rows"] if r["budget"] == max_drop]
            lines.append(f"| {result['model']} ({result['metric']}; {result['evaluation']} / {result['unseen']}) "
                         f"| {max_drop:.2%} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: how often the returned plan was within budget on the unseen samples, over "
              f"{results[0]['rows'][0]['resamples']} random splits of the pool (mean low-precision layers, mean "
              "predicted latency reduction)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    arguments = parser(__doc__, "minilm,efficientnet-lite0")
    arguments.add_argument("--resamples", type=int, default=200)
    args = arguments.parse_args()
    from common import ROOT

    results = [run_model(model, args.imagenet, args.resamples, ROOT / "var" / "cache")
               for model in args.models.split(",")]
    save(args.out, "confidence", results, markdown(results))


if __name__ == "__main__":
    main()
