"""mixq's GGUF plans beside llama.cpp's own recipes, all run in llama.cpp: SmolLM2-135M (and Gemma 3 270M with
--models smollm2-135m,gemma3-270m) searched with --runtime llama.cpp at perplexity budgets of 0.5%, 1%, 2% and 5%,
and each uniform recipe a user picks by hand (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_1, Q4_0, with llama.cpp's own choice
of type per tensor), written by llama.cpp's quantizer from the same F32 file. Per file: its tensor types, size,
perplexity on the evaluation and test windows in llama.cpp (the test windows used by no decision), decode tokens/s
at batch 1 and time to first token, each file timed against the F16 file in paired, interleaved rounds (and torch
fp32 against it too), so every speed is measured the same way. Writes bench/results/llamacpp.{json,md}.

The builtins' weights were dequantized from the GGUF files their packages ship (SmolLM2: Q4_1; Gemma 3: Q4_K_M),
so re-quantizing to that recipe gives back the shipped tensors: Q4_1 is near-lossless on SmolLM2 by construction,
as Q4_K_M is on Gemma 3. The table says so beside those rows.

    .venv/bin/python bench/llamacpp.py
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from common import ROOT, SMOKE, budgets, engine_process, kept, parser, save_by_machine

engine_process()

import torch  # noqa: E402

from worker.engine import Budget, CompressOptions, LatencyOptions, SensitivityOptions, compress  # noqa: E402
from worker.engine import generation, llamacpp  # noqa: E402
from worker.engine.data import DataOptions  # noqa: E402
from worker.engine.latency import paired  # noqa: E402
from worker.engine.pipeline import prepare  # noqa: E402
from worker.engine.sensitivity import Sensitivity  # noqa: E402

BUDGETS = (0.5,) if SMOKE else (0.005, 0.01, 0.02, 0.05)  # a smoke run's probe is accepted: one evaluation
RECIPES = ("Q4_0",) if SMOKE else ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0")
SHIPPED = {"smollm2-135m": "Q4_1", "gemma3-270m": "Q4_K_M"}  # the recipe each builtin's weights came from
SIZES = dict(calibration_samples=16, eval_samples=64, test_samples=64, batch_size=8, seq_len=64)
# The Hessian term alone, as bench/llm.py: the inter-layer leave-one-out would cost a forward pass per tensor and
# type per calibration batch.
SENSITIVITY = SensitivityOptions(ordering="random" if SMOKE else "hessian", hutchinson_max_samples=4,
                                 hessian_batches=1)
ROUNDS = 3 if SMOKE else 15
FORMATS = ("Q4_0",) if SMOKE else ()  # a smoke run checks this script: one type keeps it short


def options(budget: float, out: Path, reuse: Sensitivity | None = None) -> CompressOptions:
    return CompressOptions(budget=Budget(budget), sensitivity=SENSITIVITY, data=DataOptions(**SIZES),
                           latency=LatencyOptions(repeats=15), cache_dir=ROOT / "var" / "cache", runtime="llama.cpp",
                           formats=FORMATS, reuse_sensitivity=reuse, out_dir=out)


class Files:
    """Every file scored on the same windows and timed against the same F16 file, the same way."""

    def __init__(self, source: str, folder: Path):
        self.bench = prepare(source, options(BUDGETS[0], folder))
        self.backend, self.evaluator = self.bench.backend, self.bench.evaluator
        self.folder, self.threads = folder, torch.get_num_threads()
        self.f16 = self.backend.model(self.backend.file({layer: "F16" for layer in self.backend.layers}))
        self.baseline = {split: self.evaluator.baseline_scores(split) for split in ("evaluation", "test")}

    def row(self, name: str, path: Path, **extra) -> dict:
        model = self.backend.model(path)
        scores = {split: self.evaluator.scores(model, split) for split in self.baseline}
        budget = Budget(0.01, mode="perplexity")
        drop, stderr = budget.paired(self.baseline["test"], scores["test"])
        speeds = self.speeds(model)
        return {"plan": name, "tensor_types": dict(Counter(llamacpp.tensor_types(path).values())),
                "size_bytes": path.stat().st_size,
                "perplexity": {split: math.exp(-statistics.fmean(values)) for split, values in scores.items()},
                "float_perplexity": {split: math.exp(-statistics.fmean(v)) for split, v in self.baseline.items()},
                "test_increase": drop, "test_stderr": stderr, "speeds": speeds, **extra}

    def speeds(self, model) -> dict:
        """Decode and prefill of `model` against the F16 file, in paired, interleaved rounds."""
        speeds = {}
        for kind in generation.GENERATION_LATENCIES:
            workload = generation.workload(kind, self.bench.calibration[0])
            timing = paired(workload.call(self.f16), workload.call(model), rounds=ROUNDS, inner=1, samples=1)
            speeds[kind] = {"f16_ms": timing.first_ms, "file_ms": timing.second_ms,
                            "reduction": timing.reduction().to_dict()}
        return speeds

    def torch_fp32(self) -> dict:
        return {"plan": "torch fp32 (mixq's torch baseline, eager)", "speeds": self.speeds(self.bench.adapter)}


def run(model: str, budgets: tuple[float, ...]) -> Iterator[dict]:
    """Each row of `model` as soon as it is measured (a long run saves what it has)."""
    source = f"builtin:{model}"
    folder = Path(tempfile.mkdtemp(prefix="mixq-bench-gguf-"))
    files = Files(source, folder)
    yield {"model": model, **files.row("F32 file (the model as given)", files.backend.float_path)}
    yield {"model": model, **files.row("F16 file", files.f16.path)}
    yield {"model": model, **files.torch_fp32()}
    for name in RECIPES:
        path = folder / f"{name}.gguf"
        llamacpp.recipe(files.backend.float_path, path, name, files.threads)
        shipped = " (the shipped file's recipe: near-lossless by construction)" if SHIPPED.get(model) == name else ""
        row = files.row(f"llama.cpp {name}{shipped}", path)
        print(f"  {row['plan']}: {row['perplexity']['test']:.2f}", flush=True)
        yield {"model": model, **row}
    reuse = None
    for budget in budgets:
        started = time.perf_counter()
        out = folder / f"mixq-{budget}"
        report = compress(source, options(budget, out, reuse)).to_dict()
        wall = time.perf_counter() - started
        reuse = reuse or Sensitivity.from_report(report)
        returned = "" if report["status"] == "compressed" else f" (returned: {report['status']})"
        row = files.row(f"mixq at {budget:.1%}{returned}", out / "artifact" / "model.gguf", budget=budget,
                        evaluations=report["search"]["evaluations"], wall_seconds=round(wall, 1),
                        menu=report["backend"]["menu"]["ggml"], warnings=report["warnings"],
                        reused_analysis=report["search"]["method"].get("reused", False),
                        report_exports=report["exports"])
        print(f"  {row['plan']}: {row['tensor_types']}, {wall:.0f}s", flush=True)
        yield {"model": model, **row}


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        first = mine[0]
        lines += [f"**{model}** in llama.cpp {llamacpp_version()}, 2 threads; {SIZES['seq_len']}-token windows of news "
                  f"text, {SIZES['eval_samples']} evaluation and {SIZES['test_samples']} test windows; F32 perplexity "
                  f"{first['float_perplexity']['evaluation']:.2f} (test {first['float_perplexity']['test']:.2f}); "
                  f"decode at batch 1 after a {SIZES['seq_len']}-token prompt; every file timed against the F16 file "
                  f"in {ROUNDS} paired, interleaved rounds", "",
                  "| file | tensor types | MB | perplexity eval (test) | test increase ± SE | decode tokens/s "
                  "(F16 file → this) [reduction, 95% interval] | time to first token ms (F16 → this) | "
                  "evaluations | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for row in mine:
            decode, prefill = row["speeds"]["decode"], row["speeds"]["prefill"]
            reduction = decode["reduction"]
            speed = (f"{1000 / decode['f16_ms']:.1f} → {1000 / decode['file_ms']:.1f} [{reduction['median']:.0%}, "
                     f"{reduction['low']:.0%} to {reduction['high']:.0%}]")
            if "perplexity" not in row:
                lines.append(f"| {row['plan']} | – | – | – | – | {speed} | {prefill['f16_ms']:.0f} → "
                             f"{prefill['file_ms']:.0f} | – | – |")
                continue
            types = ", ".join(f"{n} {t}" for t, n in sorted(row["tensor_types"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {row['plan']} | {types} | {row['size_bytes'] / 1e6:.0f} | "
                         f"{row['perplexity']['evaluation']:.2f} ({row['perplexity']['test']:.2f}) | "
                         f"{row['test_increase']:+.2%} ± {row['test_stderr']:.2%} | {speed} | "
                         f"{prefill['f16_ms']:.0f} → {prefill['file_ms']:.0f} | {row.get('evaluations', '–')} | "
                         f"{row.get('wall_seconds', '–')} |")
        lines.append("")
    return "\n".join(lines)


def llamacpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def main() -> None:
    arguments = parser(__doc__, "smollm2-135m")
    arguments.add_argument("--budgets", type=budgets, default=BUDGETS,
                           help="comma-separated perplexity budgets to search at (default: %(default)s)")
    args = arguments.parse_args()
    rows = kept(args, "llamacpp", lambda row: row["model"])
    for model in args.models.split(","):
        for row in run(model, args.budgets):
            rows.append(row)
            save_by_machine(args.out, "llamacpp", rows, markdown)


if __name__ == "__main__":
    main()
