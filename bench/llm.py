"""SmolLM2-135M (builtin:smollm2-135m) at perplexity budgets of 1%, 2% and 5%, each searched twice (optimising decode
speed, then prefill: time to first token), beside uniform dynamic int8, uniform
weight-only int8 and uniform weight-only int4 (every Linear in one format), on the same news windows: per plan its
formats per layer, perplexity on the evaluation and test splits, decode tokens/s at batch 1 and time to first token
against fp32 (paired, interleaved rounds), weights size, evaluations and wall time; and the whole model cast to
the worker's fastest native float, which a plan must beat (where it does not, mixq returns the cast: status
float_cast). Writes bench/results/llm.{json,md}.

The weights were dequantized from a 4-bit GGUF file, so weight-only int4 loses less on them than it would on the
original bf16 weights: its figures here are optimistic. The uniform weight-only plans' perplexities come from
their simulation (the same quantized weights in a float matmul, equal to the kernels' outputs to float rounding:
tests/test_language_models.py): their real kernels take minutes per evaluation on this CPU (bench/lm_kernels.py).
Their speed columns, like every other, are the real kernels'.

    .venv/bin/python bench/llm.py
"""

from __future__ import annotations

import math
import statistics
import time

from common import ROOT, SMOKE, engine_process, parser, save

engine_process()

from worker.engine import Budget, CompressOptions, LatencyOptions, SensitivityOptions, compress  # noqa: E402
from worker.engine.artifact import model_size_bytes  # noqa: E402
from worker.engine.data import DataOptions  # noqa: E402
from worker.engine.kernels import LINEAR_FORMAT_NAMES, WholeCast  # noqa: E402
from worker.engine.kernels.base import join_item  # noqa: E402
from worker.engine.pipeline import _generation, prepare  # noqa: E402
from worker.engine.sensitivity import Sensitivity  # noqa: E402

SOURCE = "builtin:smollm2-135m"
BUDGETS = (0.05,) if SMOKE else (0.01, 0.02, 0.05)
SIZES = dict(calibration_samples=16, eval_samples=64, test_samples=64, batch_size=8, seq_len=64)
# The Hessian term alone: the inter-layer term's leave-one-out costs a forward pass per layer and format (633 here)
# per calibration batch, about half an hour on this CPU (docs/method.md).
SENSITIVITY = SensitivityOptions(ordering="random" if SMOKE else "hessian", hutchinson_max_samples=4,
                                 hessian_batches=1)  # a smoke run checks this script, not the analysis


FAST_ON_EVERY_CPU = ("int8",)  # scored on its real kernel everywhere
LATENCIES = ("decode",) if SMOKE else ("decode", "prefill")


def options(budget: float, reuse: Sensitivity | None = None, latency: str = "decode") -> CompressOptions:
    return CompressOptions(budget=Budget(budget), sensitivity=SENSITIVITY, data=DataOptions(**SIZES),
                           latency=LatencyOptions(repeats=15), cache_dir=ROOT / "var" / "cache",
                           reuse_sensitivity=reuse, generation_latency=latency)


def formats_of(plan: dict) -> dict:
    counts = {}
    for precision in plan["layers"].values():
        counts[precision] = counts.get(precision, 0) + 1
    return counts


def searched() -> list[dict]:
    rows, reuse = [], None
    for latency in LATENCIES:
        for budget in BUDGETS:
            started = time.perf_counter()
            report = compress(SOURCE, options(budget, reuse, latency)).to_dict()
            wall = time.perf_counter() - started
            reuse = reuse or Sensitivity.from_report(report)
            returned = "" if report["status"] == "compressed" else f" (returned: {report['status']})"
            rows.append(_row(f"mixq at {budget:.0%}, optimising {latency}{returned}", budget, report, wall))
            print(f"  {rows[-1]['plan']}: {rows[-1]['formats']}, {wall:.0f}s", flush=True)
    return rows


def _row(plan: str, budget: float, report: dict, wall: float) -> dict:
    return {"plan": plan, "budget": budget, "formats": formats_of(report["plan"]),
            "perplexity": report["metric"]["perplexity"], "test_drop": report["final"]["test_drop"],
            "test_stderr": report["final"]["test_stderr"], "generation": report["generation"],
            "size_bytes": report["final"]["size_bytes"], "evaluations": report["search"]["evaluations"],
            "wall_seconds": round(wall, 1), "reused_analysis": report["search"]["method"].get("reused", False),
            "status": report["status"], "warnings": report["warnings"], "report": report}


def uniform() -> list[dict]:
    bench = prepare(SOURCE, options(BUDGETS[0]))
    budget = Budget(0.01, mode="perplexity")
    evaluator = bench.evaluator
    baseline = {split: evaluator.baseline_scores(split) for split in ("evaluation", "test")}
    simulation = bench.backend.simulation(bench.calibration)
    rows = []
    # Every Linear in each format this worker offers (bf16 only where native), then the whole model cast to the
    # worker's fastest native float (attention and norms too), the one-line alternative a plan must beat.
    uniform_plans = [(precision, False) for precision in bench.backend.formats]
    if bench.reference_precision != bench.baseline_precision:
        uniform_plans.append((bench.reference_precision, True))
    for precision, whole in uniform_plans:
        started = time.perf_counter()
        candidates = set(bench.candidates)
        items = [item for item in (join_item(layer, precision) for layer in bench.backend.layers) if item in candidates]
        plan = bench.plan(items)
        model = WholeCast(bench.backend.baseline, precision) if whole else bench.build(plan)
        if whole or precision in FAST_ON_EVERY_CPU or bench.backend.activations == "bf16":  # real kernels, scored
            scores = {split: evaluator.scores(model, split) for split in baseline}
        else:  # weight-only kernels with fp32 activations take minutes per evaluation: their exact simulation
            with simulation.quantized(items):
                scores = {split: evaluator.scores(simulation.model, split) for split in baseline}
        drop, stderr = budget.paired(baseline["test"], scores["test"])
        simulated = not (whole or precision in FAST_ON_EVERY_CPU or bench.backend.activations == "bf16")
        name = f"whole model cast to {precision}" if whole else f"uniform {precision}"
        rows.append({"plan": name + (" (perplexity simulated)" if simulated else ""),
                     "formats": formats_of(plan.to_dict()),
                     "perplexity": {"baseline": math.exp(-statistics.fmean(baseline["evaluation"])),
                                    "final": math.exp(-statistics.fmean(scores["evaluation"])),
                                    "baseline_test": math.exp(-statistics.fmean(baseline["test"])),
                                    "final_test": math.exp(-statistics.fmean(scores["test"]))},
                     "test_drop": drop, "test_stderr": stderr,
                     "generation": _generation(bench, model, options(BUDGETS[0])),
                     "size_bytes": model_size_bytes(model), "evaluations": 1,
                     "wall_seconds": round(time.perf_counter() - started, 1)})
        print(f"  {rows[-1]['plan']}: perplexity {rows[-1]['perplexity']['final']:.2f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"SmolLM2-135M-Instruct (dequantized from a 4-bit GGUF: weight-only int4 is optimistic here), "
             f"{SIZES['seq_len']}-token windows of news text, {SIZES['eval_samples']} evaluation and "
             f"{SIZES['test_samples']} test windows (documents disjoint); fp32 perplexity "
             f"{first['perplexity']['baseline']:.2f} (test {first['perplexity']['baseline_test']:.2f}); decode at "
             f"batch 1 after a {SIZES['seq_len']}-token prompt; 2 threads", "",
             f"| plan | layers {' / '.join(('fp32', *LINEAR_FORMAT_NAMES))} | perplexity eval (test) | test increase ± SE "
             "| decode tokens/s fp32 → plan [reduction, 95% interval] | time to first token ms fp32 → plan "
             "| weights MB | evaluations | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        counts = " / ".join(str(row["formats"].get(p, 0)) for p in ("fp32", *LINEAR_FORMAT_NAMES))
        decode, prefill = row["generation"]["decode"], row["generation"]["prefill"]
        reduction = decode["reduction"]
        lines.append(
            f"| {row['plan']}{' (analysis reused)' if row.get('reused_analysis') else ''} | {counts} | {row['perplexity']['final']:.2f} ({row['perplexity']['final_test']:.2f}) "
            f"| {row['test_drop']:+.2%} ± {row['test_stderr']:.2%} "
            f"| {decode['baseline_tokens_per_second']:.1f} → {decode['plan_tokens_per_second']:.1f} "
            f"[{reduction['median']:.0%}, {reduction['low']:.0%} to {reduction['high']:.0%}] "
            f"| {prefill['baseline_ms']:.0f} → {prefill['plan_ms']:.0f} | {row['size_bytes'] / 1e6:.0f} "
            f"| {row['evaluations']} | {row['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser(__doc__, "smollm2-135m").parse_args()
    rows = searched() + uniform()
    save(args.out, "llm", rows, markdown(rows))


if __name__ == "__main__":
    main()
