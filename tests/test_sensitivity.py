import pytest
import torch

from conftest import tiny_bert, token_batch
from worker.engine.adapters import FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION, adapt
from worker.engine.data import DataOptions, split_batches
from worker.engine.evaluation import Evaluator
from worker.engine.kernels import choose_backend
from worker.engine.sensitivity import GAUSS_NEWTON, HUTCHINSON, SensitivityOptions, analyse


def _setup(labels: bool = False):
    model = tiny_bert(num_labels=2 if labels else None)
    task = SEQUENCE_CLASSIFICATION if labels else FEATURE_EXTRACTION
    adapter = adapt(model, task)
    batch = token_batch(n=40)
    target = torch.arange(40) % 2 if labels else None
    data = split_batches(batch, target, DataOptions(calibration_samples=16, eval_samples=16, test_samples=8,
                                                    batch_size=8), "random tokens")
    evaluator = Evaluator(adapter, data, task, analysis_loss="task")
    calibration = evaluator.batches("calibration")
    backend = choose_backend(adapter, "cpu", calibration[0])
    return adapter, evaluator, backend.simulation(calibration), backend.candidates


@pytest.fixture(scope="module")
def setup():
    return _setup()


def _loss(setup, subset, batches):
    _, evaluator, simulation, _ = setup
    with simulation.quantized(subset):
        return evaluator.loss_value(simulation.model, batches)


def test_conditional_term_is_measured_leave_one_out_loss(setup):
    adapter, evaluator, simulation, names = setup
    options = SensitivityOptions(ordering="augmented", interlayer="conditional", hutchinson_max_samples=4,
                                 interlayer_batches=2)
    result = analyse(simulation, evaluator, names, options, adapter)
    everything = _loss(setup, names, 2)
    for layer in result.layers[:3]:
        expected = everything - _loss(setup, set(names) - {layer.name}, 2)
        assert layer.interlayer == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert result.method["loss_evaluations"] == len(names) + 1
    assert result.method["hessian"] == GAUSS_NEWTON and result.warnings == []


def test_pairwise_term_adds_half_of_neighbour_interactions(setup):
    adapter, evaluator, simulation, names = setup
    options = SensitivityOptions(interlayer="pairwise", hutchinson_max_samples=4, interlayer_batches=2)
    result = analyse(simulation, evaluator, names, options, adapter)
    L = lambda s: _loss(setup, s, 2)  # noqa: E731
    none = L(())
    isolated = [L({n}) - none for n in names[:3]]
    pair01 = L({names[0], names[1]}) - none - isolated[0] - isolated[1]
    pair12 = L({names[1], names[2]}) - none - isolated[1] - isolated[2]
    assert result.layers[1].interlayer == pytest.approx(isolated[1] + pair01 / 2 + pair12 / 2, rel=1e-5, abs=1e-9)
    assert result.method["loss_evaluations"] == 1 + len(names) + len(names) - 1


@pytest.mark.parametrize("ordering", ["hessian", "augmented"])
def test_a_layer_that_int8_cannot_represent_is_ranked_most_sensitive(ordering):
    """Give one layer's every output row a large outlier weight: per-channel int8 then rounds the rest of
    the row to zero, so its kernel's output error dwarfs every other layer's. Both the Hessian term and the
    measured dependency term must put it last (quantized last), and the ranks must follow the order."""
    model = tiny_bert()
    adapter = adapt(model, FEATURE_EXTRACTION)
    names = [n for n, m in adapter.named_modules() if isinstance(m, torch.nn.Linear)]
    victim = next(n for n in names if n.endswith("layer.1.output.dense"))  # straight into the residual stream
    with torch.no_grad():
        weight = dict(adapter.named_modules())[victim].weight
        weight[:, 0] = 60 * weight.abs().max()
    batch = token_batch(n=40)
    data = split_batches(batch, None, DataOptions(calibration_samples=16, eval_samples=16, test_samples=8,
                                                  batch_size=8), "random tokens")
    evaluator = Evaluator(adapter, data, FEATURE_EXTRACTION)
    calibration = evaluator.batches("calibration")
    backend = choose_backend(adapter, "cpu", calibration[0])
    result = analyse(backend.simulation(calibration), evaluator, backend.candidates,
                     SensitivityOptions(ordering=ordering, hutchinson_max_samples=4, interlayer_batches=2), adapter)
    assert result.ordering[-1] == victim
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name[victim].hessian_term == max(layer.hessian_term for layer in result.layers)
    assert [by_name[n].rank for n in result.ordering] == list(range(len(result.ordering)))


def test_hessian_only_and_random_orderings(setup):
    adapter, evaluator, simulation, names = setup
    hessian = analyse(simulation, evaluator, names, SensitivityOptions(ordering="hessian", hutchinson_max_samples=4),
                      adapter)
    assert all(layer.interlayer is None for layer in hessian.layers)
    terms = {l.name: l.hessian_term for l in hessian.layers}
    assert [terms[n] for n in hessian.ordering] == sorted(terms.values())
    shuffled = analyse(simulation, evaluator, names, SensitivityOptions(ordering="random", seed=3), adapter)
    assert sorted(shuffled.ordering) == sorted(names) and shuffled.ordering != names
    assert all(layer.hessian_trace is None for layer in shuffled.layers)


def test_labelled_loss_runs_hessian_vector_products_with_the_model_kept_on_sdpa():
    adapter, evaluator, simulation, names = _setup(labels=True)
    assert adapter.model.config._attn_implementation == "sdpa"
    result = analyse(simulation, evaluator, names, SensitivityOptions(ordering="hessian", hutchinson_max_samples=4),
                     adapter)
    assert result.method["hessian"] == HUTCHINSON and result.warnings == []
    assert adapter.model.config._attn_implementation == "sdpa"  # eager only while the Hessian ran
    assert all(layer.hessian_trace is not None for layer in result.layers)


def test_a_fallback_is_never_silent(monkeypatch):
    """Without eager attention SDPA has no double backward on CPU: the labelled Hessian falls back to the
    Gauss-Newton trace, and the analysis says so in its warnings."""
    import contextlib

    from worker.engine import sensitivity

    adapter, evaluator, simulation, names = _setup(labels=True)
    monkeypatch.setattr(sensitivity, "eager_attention", lambda _adapter: contextlib.nullcontext())
    result = analyse(simulation, evaluator, names, SensitivityOptions(ordering="hessian", hutchinson_max_samples=4),
                     adapter)
    assert result.method["hessian"] == f"{GAUSS_NEWTON} (fallback)"
    assert len(result.warnings) == 1 and "Gauss-Newton" in result.warnings[0]
    assert all(layer.hessian_trace is not None for layer in result.layers)


def test_fidelity_traces_with_a_partial_calibration_batch_and_no_reference_computed_yet():
    """The fp32 reference outputs are computed lazily; computing them while the output probes hook the same
    model once added batch 0's probes to every calibration batch (a shape error with a partial last batch)."""
    adapter = adapt(tiny_bert(), FEATURE_EXTRACTION)
    data = split_batches(token_batch(n=28), None, DataOptions(calibration_samples=12, eval_samples=8,
                                                              test_samples=8, batch_size=8), "random tokens")
    evaluator = Evaluator(adapter, data, FEATURE_EXTRACTION)
    calibration = evaluator.batches("calibration")
    assert [len(b[0]) for b in calibration] == [8, 4]
    backend = choose_backend(adapter, "cpu", calibration[0])
    result = analyse(backend.simulation(calibration), evaluator, backend.candidates,
                     SensitivityOptions(ordering="hessian", hessian_batches=1, hutchinson_max_samples=4), adapter)
    assert result.method["hessian"] == GAUSS_NEWTON
    assert all(layer.hessian_trace > 0 for layer in result.layers)
