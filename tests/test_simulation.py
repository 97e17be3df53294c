"""The builtins end to end through the method's parts: the simulation reproduces the kernels, the Hessian
term runs for real (no builtin falls back) and, on MiniLM, predicts the measured loss it stands for."""

import random
import statistics

import pytest
from scipy.stats import spearmanr

from worker.engine.adapters import adapt, attention_implementation
from worker.engine.builtins import BUILTINS, load_builtin
from worker.engine.data import DataOptions
from worker.engine.evaluation import Evaluator
from worker.engine.kernels import choose_backend
from worker.engine.plan import Plan
from worker.engine.sensitivity import GAUSS_NEWTON, HUTCHINSON, LossProbe, SensitivityOptions, analyse

LARGE = ("resnet50", "mobilenetv2", "bert-base", "smollm2-135m", "gemma3-270m")


def _load(name: str, cache_dir, analysis_loss: str = "fidelity", **data):
    sizes = {"calibration_samples": 16, "eval_samples": 8, "test_samples": 8, "seq_len": 32, **data}
    builtin = load_builtin(name, DataOptions(**sizes), cache_dir)
    adapter = adapt(builtin.model, builtin.task)
    evaluator = Evaluator(adapter, builtin.default_data(), builtin.task, analysis_loss=analysis_loss)
    calibration = evaluator.batches("calibration")
    backend = choose_backend(adapter, "cpu", calibration[0])
    backend.fit(calibration)  # as the pipeline does: static int8 layers then carry their bias corrections
    return adapter, evaluator, calibration, backend


@pytest.mark.parametrize("name", ["minilm", "digits-mobilenetv2"])
def test_simulated_and_real_single_layer_losses_agree(name, cache_dir):
    # The labelled digits are compared on their cross-entropy: its changes are large enough for a relative
    # comparison, where the KL to fp32 of a half-int8 plan is 2e-4 and one rounding tie moves it by percents.
    adapter, evaluator, calibration, backend = _load(name, cache_dir, analysis_loss="task")
    simulation = backend.simulation(calibration)
    probe = LossProbe(simulation, evaluator, batches=2)
    real_base = evaluator.loss_value(backend.baseline, 2)
    assert probe(()) == pytest.approx(real_base, rel=1e-5, abs=1e-7)  # off, the simulation is the baseline
    simulated, real = [], []
    for layer in backend.candidates:
        plan = Plan(layers={n: "int8" if n == layer else "fp32" for n in backend.candidates}, backend=backend.name)
        real.append(evaluator.loss_value(backend.build(plan, calibration), 2) - real_base)
        simulated.append(probe({layer}) - probe(()))
    assert spearmanr(simulated, real).statistic >= 0.95
    assert 0.7 <= statistics.median(s / r for s, r in zip(simulated, real) if r) <= 1.4
    # Several layers at once, element-wise ops included on the FX path: still the kernels' loss. Rounding
    # ties break differently now and then (one token in a few hundred per dynamic layer; an activation one
    # int8 level apart in a static graph, 4e-4 in the logits of a half-int8 digits MobileNetV2), and with
    # many layers in int8 those differences compound through the depth: hence the looser bounds there.
    # A tie moves a loss by a fixed small amount, which a small subset's small loss change can be near: the
    # absolute allowance is 1% of the whole model's simulated change.
    if getattr(backend, "engine", None) == "x86":
        # Known gap, measured on an AVX2 EPYC (2026-12-05): on fbgemm's x86 engine (chosen where oneDNN's static
        # kernels are racy, kernels/fx_static.py) a two-layer digits-MobileNetV2 plan loses 0.0017 in
        # cross-entropy against 0.0009 simulated. Single layers agree (above); subsets are not yet exact there.
        pytest.xfail("multi-layer static int8 on the x86 engine is not yet simulated exactly")
    allowance = 0.01 * abs(probe(backend.candidates) - probe(()))
    rng = random.Random(0)
    for size, tolerance in ((2, 0.01), (len(backend.candidates) // 2, 0.05), (len(backend.candidates), 0.1)):
        subset = rng.sample(backend.candidates, size)
        plan = Plan(layers={n: "int8" if n in subset else "fp32" for n in backend.candidates}, backend=backend.name)
        real_loss = evaluator.loss_value(backend.build(plan, calibration), 2) - real_base
        assert probe(subset) - probe(()) == pytest.approx(real_loss, rel=tolerance, abs=allowance)


def test_minilm_hessian_term_predicts_the_measured_single_layer_loss(cache_dir):
    """A fidelity loss: Omega is a second-order estimate of the loss increase, in loss units. It must rank the
    layers as the measured single-layer increase does, and be of its size."""
    adapter, evaluator, calibration, backend = _load("minilm", cache_dir)
    simulation = backend.simulation(calibration)
    options = SensitivityOptions(ordering="hessian", hessian_batches=2)
    result = analyse(simulation, evaluator, backend.candidates, options, adapter)
    probe = LossProbe(simulation, evaluator, batches=2)
    measured = [probe({layer.name}) - probe(()) for layer in result.layers]
    predicted = [layer.hessian_term for layer in result.layers]
    assert spearmanr(predicted, measured).statistic > 0.9
    assert 0.7 < statistics.median(p / m for p, m in zip(predicted, measured)) < 1.4


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_no_builtin_falls_back(name, cache_dir):
    # Whether the analysis falls back does not depend on how much data it sees: the large models get little.
    small = {"calibration_samples": 4, "batch_size": 4, "seq_len": 16} if name in LARGE else {}
    adapter, evaluator, calibration, backend = _load(name, cache_dir, **small)
    assert backend.fallback is None
    options = SensitivityOptions(ordering="hessian", hutchinson_max_samples=2, hutchinson_min_samples=2,
                                 hessian_batches=1)
    result = analyse(backend.simulation(calibration), evaluator, backend.candidates, options, adapter)
    assert result.method["hessian"] == (GAUSS_NEWTON if evaluator.fidelity else HUTCHINSON)
    assert result.warnings == []
    assert all(layer.hessian_trace is not None and layer.output_error is not None for layer in result.layers)
    assert any(layer.hessian_term > 0 for layer in result.layers)
    assert attention_implementation(adapter) in (None, "sdpa")  # measured with the kernel users deploy


@pytest.mark.parametrize("name", ["digits-mobilenetv2", "mobilenetv2"])
def test_first_plans_real_metric_is_within_noise_of_the_simulated_one(name, cache_dir):
    """FX plans are truly partial: the first k layers of the ordering in int8, and nothing else, on the real
    kernels score what the simulation predicts (the sensitivity analysis is about the plans the search builds)."""
    sizes = {"calibration_samples": 16, "eval_samples": 32, "batch_size": 8}
    adapter, evaluator, calibration, backend = _load(name, cache_dir, **sizes)
    simulation = backend.simulation(calibration)
    result = analyse(simulation, evaluator, backend.candidates,
                     SensitivityOptions(ordering="hessian", hutchinson_max_samples=2, hutchinson_min_samples=2,
                                        hessian_batches=1), adapter)
    # One flipped answer for a top-1 metric; rounding ties for a continuous one.
    noise = 1 / evaluator.data.sizes["evaluation"] if evaluator.metric_name.startswith("top1") else 1e-3
    for k in (1, 2, 3):
        low = result.ordering[:k]
        plan = Plan(layers={n: "int8" if n in low else "fp32" for n in backend.candidates}, backend=backend.name)
        real = evaluator.metric(backend.build(plan, calibration))
        with simulation.quantized(low):
            simulated = evaluator.metric(simulation.model)
        assert abs(real - simulated) <= noise, (k, real, simulated)
