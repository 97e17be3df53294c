"""Does the sensitivity analysis see what the kernels do? Per builtin, every candidate layer alone in int8:

1. Simulation vs kernel: the loss increase on the calibration batches under the backend's simulation (what
   the analysis uses) against the real kernels (what is delivered).
2. Hessian term vs measured damage: Omega_i = 1/2 Tr(d²L/dy_i²)/n_i ||y_i~ - y_i||² against what the layer
   alone really does on held-out evaluation samples: the loss increase it stands for, and, for classifiers,
   its KL to the float model and the top-1 answers it changes. Labelled classifiers are scored with both
   analysis losses (KL to fp32 by Gauss-Newton, the labels' cross-entropy by Hutchinson), which is how the
   default analysis loss was chosen.

Writes bench/results/simulation.{json,md}.

    .venv/bin/python bench/simulation.py [--models minilm,digits-mobilenetv2,digits-resnet,efficientnet-lite0]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from common import INT8, ROOT, data_for, engine_process, kept, parser, save_by_machine

engine_process()

from scipy.stats import spearmanr  # noqa: E402

from worker.engine.pipeline import CompressOptions, prepare  # noqa: E402
from worker.engine.plan import Plan  # noqa: E402
from worker.engine.search import Budget  # noqa: E402
from worker.engine.sensitivity import LossProbe, SensitivityOptions, analyse  # noqa: E402


def agreement(predicted: list[float], measured: list[float]) -> dict:
    ratios = [p / m for p, m in zip(predicted, measured) if m > 0]
    return {"spearman": float(spearmanr(predicted, measured).statistic),
            "median_ratio": statistics.median(ratios) if ratios else None, "layers": len(measured)}


@torch.inference_mode()
def damage(evaluator, model) -> dict:
    """What a model does on the evaluation split against the float reference: mean KL, answers changed, and
    (with labels) the cross-entropy increase."""
    kl, flips, ce = 0.0, 0, 0.0
    for batch, reference in zip(evaluator.data.evaluation, evaluator.reference["evaluation"]):
        out = model(*evaluator.inputs(batch)).float()
        if evaluator.embedding:
            kl += float(0.5 * (out - reference).pow(2).sum(-1).sum())
            continue
        kl += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(reference, -1), log_target=True, reduction="sum"))
        flips += int((out.argmax(-1) != reference.argmax(-1)).sum())
        if evaluator.labelled:
            ce += float(F.cross_entropy(out, batch["labels"], reduction="sum")
                        - F.cross_entropy(reference, batch["labels"], reduction="sum"))
    n = evaluator.data.sizes["evaluation"]
    return {"kl": kl / n, "flips": flips, "ce": ce / n}


def run_model(name: str, imagenet, batches: int, eval_samples: int) -> dict:
    data, root = data_for(name, imagenet, calibration_samples=8 * batches, eval_samples=eval_samples,
                          test_samples=8, batch_size=8, seq_len=128)
    bench = prepare(f"builtin:{name}", CompressOptions(budget=Budget(0.01), data=data, model_root=root,
                                                       cache_dir=ROOT / "var" / "cache", formats=INT8))
    evaluator, backend, calibration = bench.evaluator, bench.backend, bench.calibration
    started = time.perf_counter()
    simulation = backend.simulation(calibration)
    built = time.perf_counter() - started
    probe = LossProbe(simulation, evaluator, batches)
    base = evaluator.loss_value(backend.baseline, batches)
    real, simulated, measured = [], [], []
    for layer in backend.candidates:
        plan = Plan(layers={n: "int8" if n == layer else "fp32" for n in backend.candidates}, backend=backend.name)
        model = backend.build(plan, calibration)
        real.append(evaluator.loss_value(model, batches) - base)
        simulated.append(probe({layer}) - probe(()))
        measured.append(damage(evaluator, model))
    losses = ("fidelity", "task") if evaluator.labelled else ("fidelity",)
    omegas, hessians, seconds = {}, {}, {}
    for loss in losses:
        evaluator.task_loss = loss == "task"  # what the analysis scores layers on (the metric is unchanged)
        started = time.perf_counter()
        result = analyse(simulation, evaluator, backend.candidates,
                         SensitivityOptions(ordering="hessian", hessian_batches=batches, loss=loss), bench.adapter)
        seconds[loss] = round(time.perf_counter() - started, 2)
        omegas[loss], hessians[loss] = [layer.hessian_term for layer in result.layers], result.method["hessian"]
    evaluator.task_loss = False
    targets = {"kl": [m["kl"] for m in measured]}
    if not evaluator.embedding:
        targets["flips"] = [m["flips"] for m in measured]
    if evaluator.labelled:
        targets["ce"] = [m["ce"] for m in measured]
    return {
        "model": name, "backend": backend.name, "metric": evaluator.metric_name, "labelled": evaluator.labelled,
        "calibration_samples": 8 * batches, "evaluation_samples": evaluator.data.sizes["evaluation"],
        "simulation_vs_kernel": agreement(simulated, real),
        "hessian_term_vs_measured": {loss: {target: agreement(omegas[loss], values) for target, values in
                                            targets.items()} for loss in losses},
        "hessian": hessians, "seconds": {"simulation_build": round(built, 2), "hessian_term": seconds},
        "per_layer": [{"name": n, "real": r, "simulated": s, **m, **{f"omega_{loss}": omegas[loss][i]
                                                                    for loss in losses}}
                      for i, (n, r, s, m) in enumerate(zip(backend.candidates, real, simulated, measured))],
    }


def markdown(results: list[dict]) -> str:
    lines = ["| model | backend | analysis loss (estimator) | simulated vs kernel: Spearman, median ratio "
             "| Omega vs measured KL (embeddings: ½‖Δ‖²) | vs answers changed | vs cross-entropy increase "
             "| seconds (simulation, Omega) |", "|---|---|---|---|---|---|---|---|"]

    def cell(fits: dict, target: str) -> str:
        fit = fits.get(target)
        return "–" if fit is None else f"{fit['spearman']:.3f}"

    for r in results:
        sim = r["simulation_vs_kernel"]
        for loss, fits in r["hessian_term_vs_measured"].items():
            lines.append(f"| {r['model']} ({sim['layers']} layers) | {r['backend']} | {loss} ({r['hessian'][loss]}) "
                         f"| {sim['spearman']:.3f}, {sim['median_ratio']:.3f} | {cell(fits, 'kl')} "
                         f"| {cell(fits, 'flips')} | {cell(fits, 'ce')} "
                         f"| {r['seconds']['simulation_build']}, {r['seconds']['hessian_term'][loss]} |")
    lines += ["", "Spearman rank correlations over the model's layers, each alone in int8 on the real kernels, "
              "damage measured on held-out evaluation samples (calibration batches for the simulation check)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    arguments = parser(__doc__, "minilm,digits-mobilenetv2,digits-resnet,efficientnet-lite0")
    arguments.add_argument("--batches", type=int, default=2, help="calibration batches of 8")
    arguments.add_argument("--eval-samples", type=int, default=256)
    args = arguments.parse_args()
    results = kept(args, "simulation", lambda result: result["model"])
    for name in args.models.split(","):
        print(f"{name}...", flush=True)
        results.append(run_model(name, args.imagenet, args.batches, args.eval_samples))
        save_by_machine(args.out, "simulation", results, markdown)


if __name__ == "__main__":
    main()
