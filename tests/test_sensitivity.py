import pytest

from conftest import tiny_bert, token_batch
from worker.engine.adapters import FEATURE_EXTRACTION, adapt, quantizable_layers
from worker.engine.data import DataOptions, split_batches
from worker.engine.evaluation import Evaluator
from worker.engine.quantize import simulated
from worker.engine.sensitivity import SensitivityOptions, analyse


@pytest.fixture(scope="module")
def setup():
    adapter = adapt(tiny_bert(), FEATURE_EXTRACTION)
    batch = token_batch(n=32)
    data = split_batches(batch, None, DataOptions(calibration_samples=16, eval_samples=16, batch_size=8),
                         "random tokens")
    evaluator = Evaluator(adapter, data, FEATURE_EXTRACTION)
    return adapter, evaluator, list(quantizable_layers(adapter))


def _loss(adapter, evaluator, subset, batches):
    with simulated(adapter, subset):
        return evaluator.loss_value(adapter, batches)


def test_conditional_term_is_measured_leave_one_out_loss(setup):
    adapter, evaluator, names = setup
    options = SensitivityOptions(ordering="augmented", interlayer="conditional", hutchinson_max_samples=4,
                                 interlayer_batches=2)
    result = analyse(adapter, evaluator, names, options)
    everything = _loss(adapter, evaluator, names, 2)
    for layer in result.layers[:3]:
        expected = everything - _loss(adapter, evaluator, set(names) - {layer.name}, 2)
        assert layer.interlayer == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert result.method["loss_evaluations"] == len(names) + 1
    assert result.method["hessian"] == "hutchinson"


def test_pairwise_term_adds_half_of_neighbour_interactions(setup):
    adapter, evaluator, names = setup
    options = SensitivityOptions(interlayer="pairwise", hutchinson_max_samples=4, interlayer_batches=2)
    result = analyse(adapter, evaluator, names, options)
    L = lambda s: _loss(adapter, evaluator, s, 2)  # noqa: E731
    none = L(())
    isolated = [L({n}) - none for n in names[:3]]
    pair01 = L({names[0], names[1]}) - none - isolated[0] - isolated[1]
    pair12 = L({names[1], names[2]}) - none - isolated[1] - isolated[2]
    assert result.layers[1].interlayer == pytest.approx(isolated[1] + pair01 / 2 + pair12 / 2, rel=1e-5, abs=1e-9)
    assert result.method["loss_evaluations"] == 1 + len(names) + len(names) - 1


def test_ordering_is_ascending_score_and_ranks_match(setup):
    adapter, evaluator, names = setup
    result = analyse(adapter, evaluator, names, SensitivityOptions(hutchinson_max_samples=4, interlayer_batches=1))
    by_name = {layer.name: layer for layer in result.layers}
    scores = [by_name[n].score for n in result.ordering]
    assert scores == sorted(scores)
    assert [by_name[n].rank for n in result.ordering] == list(range(len(names)))
    assert sorted(result.ordering) == sorted(names)
    for layer in result.layers:  # Omega = Tr(H)/n * ||Q(W) - W||^2
        assert layer.hessian_term == pytest.approx(layer.hessian_trace / layer.params * layer.quant_error)
        assert layer.score == pytest.approx(layer.hessian_part + layer.interlayer_part)
        assert layer.trace_stderr > 0


def test_hessian_only_and_random_orderings(setup):
    adapter, evaluator, names = setup
    hessian = analyse(adapter, evaluator, names, SensitivityOptions(ordering="hessian", hutchinson_max_samples=4))
    assert all(layer.interlayer is None for layer in hessian.layers)
    terms = {l.name: l.hessian_term for l in hessian.layers}
    assert [terms[n] for n in hessian.ordering] == sorted(terms.values())
    shuffled = analyse(adapter, evaluator, names, SensitivityOptions(ordering="random", seed=3))
    assert sorted(shuffled.ordering) == sorted(names) and shuffled.ordering != names
    assert all(layer.hessian_trace is None for layer in shuffled.layers)


def test_falls_back_to_gradient_free_proxy_without_double_backward():
    model = tiny_bert()
    adapter = adapt(model, FEATURE_EXTRACTION)
    model.config._attn_implementation = "sdpa"  # SDPA on CPU has no double backward
    data = split_batches(token_batch(n=16), None, DataOptions(calibration_samples=8, eval_samples=8), "tokens")
    evaluator = Evaluator(adapter, data, FEATURE_EXTRACTION)
    names = list(quantizable_layers(adapter))
    result = analyse(adapter, evaluator, names, SensitivityOptions(ordering="hessian"))
    assert result.method["hessian"].startswith("gradient-free proxy")
    assert all(l.hessian_trace is None and l.hessian_term is not None for l in result.layers)
