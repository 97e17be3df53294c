"""How well the torch simulation the analysis runs for `--runtime llama.cpp` predicts llama.cpp itself: per GGML type,
every tensor it fits in that type, on SmolLM2-135M's evaluation and test windows. The perplexity llama.cpp gives that
file, the simulation's (llama.cpp's own quantized weights, each layer's input rounded as llama.cpp rounds activations
for that type's dot products), and the simulation with float inputs (weights alone), so the table shows what the
activation rounding accounts for. "Explained" is the simulated increase of the mean log-likelihood loss as a share of
llama.cpp's. Writes bench/results/ggml_simulation.{json,md}.

    .venv/bin/python bench/ggml_simulation.py
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

from common import ROOT, SMOKE, engine_process, parser, save

engine_process()

from worker.engine import llamacpp  # noqa: E402
from worker.engine.data import DataOptions  # noqa: E402
from worker.engine.kernels import gguf_types  # noqa: E402
from worker.engine.kernels.base import join_item  # noqa: E402
from worker.engine.pipeline import CompressOptions, prepare  # noqa: E402
from worker.engine.search import Budget  # noqa: E402

SOURCE = "builtin:smollm2-135m"
SIZES = dict(calibration_samples=8, eval_samples=64, test_samples=64, batch_size=8, seq_len=64)
TYPES = ("Q4_0",) if SMOKE else llamacpp.TYPES
SPLITS = ("evaluation", "test")


@contextmanager
def float_inputs():
    """The simulation with each layer's input left in float: its weights alone."""
    rounded = gguf_types.fake_activation
    gguf_types.fake_activation = lambda x, _type: x
    try:
        yield
    finally:
        gguf_types.fake_activation = rounded


def main() -> None:
    args = parser(__doc__, "smollm2-135m").parse_args()
    bench = prepare(SOURCE, CompressOptions(budget=Budget(0.01), data=DataOptions(**SIZES), runtime="llama.cpp",
                                            formats=TYPES, cache_dir=ROOT / "var" / "cache"))
    backend, evaluator = bench.backend, bench.evaluator
    # Every asked type, whatever this worker's menu kept: this measures the simulation, not the speeds.
    backend.formats = TYPES
    backend.candidates = [join_item(layer, t) for layer in backend.layers for t in TYPES
                          if llamacpp.fits(t, backend.adapter.get_submodule(layer).in_features)]
    simulation = backend.simulation(bench.calibration)
    baseline = {split: statistics.fmean(evaluator.baseline_scores(split)) for split in SPLITS}
    rows = []
    for ggml_type in TYPES:
        layers = backend.uniform(ggml_type)
        real = {s: statistics.fmean(evaluator.scores(backend.model(backend.file(layers)), s)) for s in SPLITS}
        items = [join_item(layer, ggml_type) for layer in layers]
        with simulation.quantized(items):
            simulated = {s: statistics.fmean(evaluator.scores(simulation.model, s)) for s in SPLITS}
            with float_inputs():
                weights_only = {s: statistics.fmean(evaluator.scores(simulation.model, s)) for s in SPLITS}

        def explained(figures: dict, split: str) -> float | None:
            lost = baseline[split] - real[split]
            return (baseline[split] - figures[split]) / lost if lost > 0 else None

        rows.append({"type": ggml_type, "layers": len(layers),
                     "float_perplexity": {s: math.exp(-baseline[s]) for s in SPLITS},
                     "llama_cpp": {s: math.exp(-real[s]) for s in SPLITS},
                     "simulated": {s: math.exp(-simulated[s]) for s in SPLITS},
                     "weights_only": {s: math.exp(-weights_only[s]) for s in SPLITS},
                     "explained": {s: explained(simulated, s) for s in SPLITS},
                     "explained_weights_only": {s: explained(weights_only, s) for s in SPLITS}})
        print(f"  {ggml_type}: {rows[-1]['llama_cpp']} vs {rows[-1]['simulated']}", flush=True)
    save(args.out, "ggml_simulation", rows, markdown(rows))


# A share of a loss this small is a ratio of two rounding-sized differences, not a measure of the simulation.
MATERIAL = 0.005  # llama.cpp's perplexity increase below which "explained" is not shown (the smallest budget)


def markdown(rows: list[dict]) -> str:
    first = rows[0]["float_perplexity"]
    lines = [f"SmolLM2-135M, every tensor a type fits in that type; {SIZES['seq_len']}-token windows of news text, "
             f"{SIZES['eval_samples']} evaluation and {SIZES['test_samples']} test windows; F32 perplexity "
             f"{first['evaluation']:.2f} (test {first['test']:.2f}). Perplexity eval (test); explained: the simulated "
             f"loss increase as a share of llama.cpp's, shown where llama.cpp's perplexity rises {MATERIAL:.1%} or more",
             "",
             "| type | tensors | llama.cpp | simulated | explained | weights alone (float inputs) | explained |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cell = lambda f: f"{row[f]['evaluation']:.2f} ({row[f]['test']:.2f})"  # noqa: E731
        material = {split: row["llama_cpp"][split] >= (1 + MATERIAL) * row["float_perplexity"][split]
                    for split in SPLITS}

        def shares(figure: str) -> str:
            evaluation, test = ("–" if not material[split] or row[figure][split] is None
                                else f"{row[figure][split]:.0%}" for split in SPLITS)
            return f"{evaluation} ({test})"
        lines.append(f"| {row['type']} | {row['layers']} | {cell('llama_cpp')} | {cell('simulated')} | "
                     f"{shares('explained')} | {cell('weights_only')} | {shares('explained_weights_only')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
