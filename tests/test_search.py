import math

import pytest

from worker.engine.search import Budget, bisect_layers, cost_aware_order, max_evaluations, search


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


def _additive(costs: dict[str, float]):
    """Metric 1 - sum of the low layers' costs; records every evaluated set."""
    calls = []

    def evaluate(low):
        calls.append(list(low))
        return 1.0 - sum(costs[n] for n in low)

    return evaluate, calls


def test_cost_aware_order_puts_cheap_savings_first():
    cost = {"free": -0.001, "tiny": 0.001, "big_saver": 0.004, "useless": 0.0005, "slow": 0.01}
    saving = {"free": 2.0, "tiny": 0.1, "big_saver": 10.0, "useless": 0.0, "slow": 5.0}
    # free first (no cost), then cost per ms: big_saver 0.0004, slow 0.002, tiny 0.01; saving nothing: last
    assert cost_aware_order(list(cost), cost, saving) == ["free", "big_saver", "slow", "tiny", "useless"]


def test_cost_aware_selection_finds_the_faster_plan_at_equal_accuracy():
    """The least sensitive layers are not the ones worth quantizing: the small ones save almost nothing.
    Within the same budget the cost-aware order buys the big savers and ends up much faster."""
    small = {f"small{i}": 0.0010 for i in range(6)}  # least sensitive, 0.05 ms each
    big = {f"big{i}": 0.0015 for i in range(6)}  # a bit more sensitive, 5 ms each
    costs = {**small, **big}
    saving = {**{n: 0.05 for n in small}, **{n: 5.0 for n in big}}
    budget = Budget(max_drop=0.0095)  # room for six layers, whichever they are
    by_sensitivity = sorted(costs, key=costs.get)
    by_cost = cost_aware_order(list(costs), costs, saving)
    results = {}
    for name, order in (("sensitivity", by_sensitivity), ("cost-aware", by_cost)):
        evaluate, _ = _additive(costs)
        result = search(order, evaluate, 1.0, budget, refinement=0)
        results[name] = (result.best, sum(saving[n] for n in result.best), 1.0 - sum(costs[n] for n in result.best))
    (sens_low, sens_ms, sens_metric), (cost_low, cost_ms, cost_metric) = results["sensitivity"], results["cost-aware"]
    assert set(small) <= set(sens_low) and len(sens_low) == 8  # all six small layers, then two big ones
    assert set(cost_low) == set(big)  # every big saver
    assert cost_metric == pytest.approx(sens_metric) and budget.accepts(budget.drop(1.0, cost_metric))
    assert cost_ms == pytest.approx(30.0) and sens_ms == pytest.approx(10.3)  # same accuracy, 3x the saving


def test_refinement_skips_the_first_failing_layer_within_its_bound():
    order = [f"l{i}" for i in range(20)]
    costs = {n: 0.0005 for n in order}
    costs["l5"] = 0.5  # one layer breaks any budget: the prefix bisection stops at k=5
    evaluate, calls = _additive(costs)
    result = search(order, evaluate, 1.0, Budget(0.01), refinement=3)
    bisection = [s for s in result.steps if s.stage == "bisection"]
    refinement = [s for s in result.steps if s.stage == "refinement"]
    assert max(s.k for s in bisection if s.accepted) == 5
    assert len(refinement) == 3 and result.evaluations <= max_evaluations(20, 3)
    assert all(s.skipped[0] == "l5" and s.accepted for s in refinement)
    assert result.best == [n for n in order[:9] if n != "l5"] and result.best_k == 8
    assert [s.low(order) for s in result.steps] == calls  # every evaluated point is in the steps


def test_refinement_recovers_a_plan_when_the_first_layer_fails():
    order = ["bad", "a", "b", "c", "d"]
    costs = {"bad": 0.5, "a": 0.001, "b": 0.001, "c": 0.5, "d": 0.001}
    evaluate, _ = _additive(costs)
    result = search(order, evaluate, 1.0, Budget(0.01), refinement=3)
    assert [s.stage for s in result.steps] == ["bisection", "bisection", "refinement", "refinement", "refinement"]
    assert result.best == ["a", "b"] and result.status == "ok"
    assert result.steps[-1].skipped == ["bad"] and result.steps[-1].low(order) == ["a", "b", "c"]
    assert not result.steps[-1].accepted


def test_no_refinement_once_everything_fits_or_the_range_is_reached():
    order = [f"l{i}" for i in range(10)]
    evaluate, _ = _additive({n: 0.0001 for n in order})
    assert search(order, evaluate, 1.0, Budget(0.01)).evaluations == 1  # all low passes at once
    evaluate, _ = _additive({n: 0.002 for n in order})
    result = search(order, evaluate, 1.0, Budget(max_drop=0.012, min_drop=0.005))
    assert all(s.stage == "bisection" for s in result.steps) and result.best_k >= 3
