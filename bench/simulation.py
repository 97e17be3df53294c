"""Does the sensitivity analysis see what the kernels do? Two checks per builtin, on its calibration batches:

1. Simulation vs kernel: for every candidate layer alone in int8, the loss increase under the backend's
   simulation (what the analysis uses) against the real kernels (what is delivered).
2. Hessian term vs measured: the second-order estimate Omega_i = 1/2 Tr(d²L/dy_i²)/n_i ||y_i~ - y_i||²
   against the measured single-layer loss increase it stands for.

Writes bench/results/simulation.{json,md}.

    .venv/bin/python bench/simulation.py [--models minilm,digits-mobilenetv2,digits-resnet]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import ROOT, engine_process, parser, save

engine_process()

from scipy.stats import spearmanr  # noqa: E402

from worker.engine.adapters import adapt  # noqa: E402
from worker.engine.builtins import load_builtin  # noqa: E402
from worker.engine.data import DataOptions  # noqa: E402
from worker.engine.evaluation import Evaluator  # noqa: E402
from worker.engine.kernels import choose_backend  # noqa: E402
from worker.engine.plan import Plan  # noqa: E402
from worker.engine.sensitivity import LossProbe, SensitivityOptions, analyse  # noqa: E402


def agreement(predicted: list[float], measured: list[float]) -> dict:
    ratios = [p / m for p, m in zip(predicted, measured) if m > 0]
    return {"spearman": float(spearmanr(predicted, measured).statistic),
            "median_ratio": statistics.median(ratios) if ratios else None, "layers": len(measured)}


def run_model(name: str, cache_dir: Path, batches: int) -> dict:
    data = DataOptions(calibration_samples=8 * batches, eval_samples=8, test_samples=8, batch_size=8, seq_len=128)
    builtin = load_builtin(name, data, cache_dir)
    adapter = adapt(builtin.model, builtin.task)
    evaluator = Evaluator(adapter, builtin.data, builtin.task)
    calibration = evaluator.batches("calibration")
    backend = choose_backend(adapter, "cpu", calibration[0])
    started = time.perf_counter()
    simulation = backend.simulation(calibration)
    built = time.perf_counter() - started
    probe = LossProbe(simulation, evaluator, batches)
    base = evaluator.loss_value(backend.baseline, batches)
    real, simulated = [], []
    for layer in backend.candidates:
        plan = Plan(layers={n: "int8" if n == layer else "fp32" for n in backend.candidates}, backend=backend.name)
        real.append(evaluator.loss_value(backend.build(plan, calibration), batches) - base)
        simulated.append(probe({layer}) - probe(()))
    started = time.perf_counter()
    result = analyse(simulation, evaluator, backend.candidates,
                     SensitivityOptions(ordering="hessian", hessian_batches=batches), adapter)
    hessian_seconds = time.perf_counter() - started
    omega = [layer.hessian_term for layer in result.layers]
    return {
        "model": name, "backend": backend.name, "loss": "fidelity" if evaluator.fidelity else "cross-entropy",
        "hessian": result.method["hessian"], "calibration_samples": 8 * batches,
        "simulation_vs_kernel": agreement(simulated, real),
        "hessian_term_vs_measured": agreement(omega, real),
        "seconds": {"simulation_build": round(built, 2), "hessian_term": round(hessian_seconds, 2)},
        "per_layer": [{"name": n, "real": r, "simulated": s, "hessian_term": o}
                      for n, r, s, o in zip(backend.candidates, real, simulated, omega)],
    }


def markdown(results: list[dict]) -> str:
    lines = ["| model | backend | loss | Hessian | simulated vs kernel: Spearman, median ratio "
             "| Omega vs measured: Spearman, median ratio | seconds (simulation build, Hessian term) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        sim, omega = r["simulation_vs_kernel"], r["hessian_term_vs_measured"]
        ratio = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {r['model']} ({sim['layers']} layers) | {r['backend']} | {r['loss']} | {r['hessian']} "
                     f"| {sim['spearman']:.3f}, {ratio(sim['median_ratio'])} "
                     f"| {omega['spearman']:.3f}, {ratio(omega['median_ratio'])} "
                     f"| {r['seconds']['simulation_build']}, {r['seconds']['hessian_term']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    arguments = parser(__doc__, "minilm,digits-mobilenetv2,digits-resnet")
    arguments.add_argument("--batches", type=int, default=2, help="calibration batches of 8")
    args = arguments.parse_args()
    results = []
    for name in args.models.split(","):
        print(f"{name}...", flush=True)
        results.append(run_model(name, ROOT / "var" / "cache", args.batches))
    save(args.out, "simulation", results, markdown(results))


if __name__ == "__main__":
    main()
