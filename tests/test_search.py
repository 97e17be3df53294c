import math

import pytest

from worker.engine.search import Budget, bisect_layers, max_evaluations


def monotone(threshold: int, layers: int, slope: float = 1e-5):
    """Metric falls `slope` per low-precision layer, and by 10% past `threshold`: a 1% budget admits k <= threshold."""
    calls = []

    def evaluate(k: int) -> float:
        calls.append(k)
        return 1.0 - slope * k - (0.1 if k > threshold else 0.0)

    return evaluate, calls


@pytest.mark.parametrize("layers", [2, 3, 7, 8, 37, 74, 161])
def test_bisection_finds_largest_k_within_budget(layers):
    budget = Budget(max_drop=0.01)
    for threshold in range(1, layers):
        evaluate, calls = monotone(threshold, layers)
        result = bisect_layers(layers, evaluate, 1.0, budget)
        assert result.best_k == threshold
        assert result.evaluations == len(calls) <= max_evaluations(layers)
        assert max_evaluations(layers) == math.ceil(math.log2(layers + 1)) + 2
        assert [s.k for s in result.steps] == calls
        assert all(s.accepted == (s.k <= threshold) for s in result.steps)


def test_all_low_passing_stops_after_one_evaluation():
    result = bisect_layers(20, lambda k: 1.0, 1.0, Budget(0.01))
    assert (result.best_k, result.evaluations, result.status) == (20, 1, "all_low")


def test_one_layer_failing_returns_baseline_status():
    result = bisect_layers(20, lambda k: 0.5, 1.0, Budget(0.01))
    assert (result.best_k, result.status) == (0, "none_fit")
    assert [s.k for s in result.steps] == [20, 1]


def test_min_drop_stops_once_inside_the_range():
    evaluate, calls = monotone(threshold=60, layers=64, slope=0.0005)
    # drop at k is 0.0005 k: k=32 gives 0.016, inside [0.015, 0.025], so the search stops there
    result = bisect_layers(64, evaluate, 1.0, Budget(max_drop=0.025, min_drop=0.015))
    assert result.best_k == 32
    assert calls == [64, 1, 32]


def test_absolute_budget_uses_metric_points():
    budget = Budget(max_drop=0.05, mode="absolute")
    assert budget.drop(0.5, 0.46) == pytest.approx(0.04)
    assert Budget(max_drop=0.05).drop(0.5, 0.46) == pytest.approx(0.08)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5])
def test_budget_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Budget(max_drop=bad)


def test_min_drop_above_max_is_refused():
    with pytest.raises(ValueError, match="min_drop"):
        Budget(max_drop=0.01, min_drop=0.02)


def test_unknown_budget_mode_is_refused():
    with pytest.raises(ValueError, match="budget mode"):
        Budget(max_drop=0.01, mode="percent")
