"""Augmented vs Hessian-only vs random ordering: accuracy-latency frontier per builtin model, at budgets that
every-layer-int8 breaks (MiniLM 0.5% cosine fidelity; EfficientNet-Lite0 0.5% top-1 on the ImageNet sample).

For each model and ordering it runs the real pipeline (`compress`) on the same data, then scores each
ordering at fixed k (a quarter, half and three quarters of the layers in int8) so the orderings are
compared at equal compression. Writes bench/results/ordering.{json,md}.

    .venv/bin/python bench/ordering.py                       # MiniLM and EfficientNet-Lite0
    .venv/bin/python bench/ordering.py --models resnet50,mobilenetv2,bert-base --quick   # full size
"""

from __future__ import annotations

import time
from pathlib import Path

from common import INT8, ROOT, cost_cell, data_for, engine_process, kept, parser, reduction_cell, save_by_machine

engine_process()

from worker.engine import Budget, CompressOptions, LatencyOptions, SensitivityOptions, compress  # noqa: E402
from worker.engine.pipeline import prepare  # noqa: E402

ORDERINGS = ("augmented", "hessian", "random")
FRACTIONS = (0.25, 0.5, 0.75)


# Budgets every ordering has to search under: every layer in int8 breaks them on these models.
BUDGETS = {"minilm": 0.005, "efficientnet-lite0": 0.005}


def options_for(model: str, ordering: str, quick: bool, cache_dir: Path, imagenet: Path) -> CompressOptions:
    big = model in ("resnet50", "mobilenetv2", "bert-base")
    sizes = dict(calibration_samples=32 if big else 128, eval_samples=64 if big else 256,
                 test_samples=64 if big else 256, batch_size=8, seq_len=128)
    if model.startswith("efficientnet"):
        sizes.update(eval_samples=512, test_samples=360)
    data, root = data_for(model, imagenet, **sizes)
    return CompressOptions(
        budget=Budget(BUDGETS.get(model, 0.01)),
        sensitivity=SensitivityOptions(ordering=ordering, hutchinson_max_samples=4 if quick else 16,
                                       hessian_batches=1 if big else 2, interlayer_batches=1 if big else 4),
        data=data, model_root=root,
        latency=LatencyOptions(warmup=2 if big else 3, repeats=5 if big else 15),
        cache_dir=cache_dir, formats=INT8,  # orderings of int8 layers, whatever else this CPU's menu offers
    )


def run_model(model: str, quick: bool, cache_dir: Path, imagenet: Path) -> dict:
    source = f"builtin:{model}"
    reports = {}
    for ordering in ORDERINGS:
        started = time.perf_counter()
        reports[ordering] = compress(source, options_for(model, ordering, quick, cache_dir, imagenet)).to_dict()
        reports[ordering]["wall_seconds"] = round(time.perf_counter() - started, 1)
        print(f"  {model} {ordering}: {reports[ordering]['status']}, k={reports[ordering]['final']['k']}, "
              f"reduction {reports[ordering]['latency_reduction']:.1%}, {reports[ordering]['wall_seconds']}s",
              flush=True)
    bench = prepare(source, options_for(model, "augmented", quick, cache_dir, imagenet))
    layers = len(bench.candidates)
    grid = {}
    for ordering, report in reports.items():
        order = [layer["name"] for layer in sorted(report["layers"], key=lambda l: l["rank"])]
        grid[ordering] = {}
        for fraction in FRACTIONS:
            k = max(1, round(fraction * layers))
            grid[ordering][k] = bench.evaluator.metric(bench.build(bench.plan(order[:k])))
    return {"model": model, "layers": layers, "reports": reports, "grid": grid}


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | budget | ordering | metric at k = 25% / 50% / 75% of layers | search: evaluations | chosen k "
        "| metric (base → final) | test split (base → final) | latency ms (base → final) | reduction [95% interval] "
        "| samples: forward / simulated / backward | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for ordering, report in result["reports"].items():
            grid = " / ".join(f"{m:.4f} (k={k})" for k, m in result["grid"][ordering].items())
            lines.append(
                f"| {result['model']} ({result['layers']} layers, {report['metric']['name']}) "
                f"| {report['budget']['max_drop']:.1%} | {ordering} | {grid} "
                f"| {report['search']['evaluations']} | {report['final']['k']} "
                f"| {report['baseline']['metric']:.4f} → {report['final']['metric']:.4f} "
                f"| {report['baseline']['test_metric']:.4f} → {report['final']['test_metric']:.4f} "
                f"| {report['baseline']['latency_ms']['median']:.1f} → {report['final']['latency_ms']['median']:.1f} "
                f"| {reduction_cell(report['latency']['reduction'], report['latency_reduction'])} "
                f"| {cost_cell(report['cost']['total'])} | {report['wall_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    arguments = parser(__doc__, "minilm,efficientnet-lite0")
    arguments.add_argument("--quick", action="store_true", help="4 Hutchinson samples (full-size models on a CPU)")
    arguments.add_argument("--name", default="ordering")
    args = arguments.parse_args()
    results = kept(args, args.name, lambda result: result["model"])
    for model in args.models.split(","):
        print(f"{model}:", flush=True)
        results.append(run_model(model, args.quick, ROOT / "var" / "cache", args.imagenet))
    save_by_machine(args.out, args.name, results, markdown)


if __name__ == "__main__":
    main()
