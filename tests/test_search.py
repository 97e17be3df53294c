import math
import random
import statistics

import pytest

from worker.engine.search import Budget, Measurement, Step, bisect_layers, cost_aware_order, max_evaluations, search


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


def test_cost_aware_prefixes_buy_more_saving_than_sensitivity_prefixes_at_the_same_budget():
    """On random additive problems (each layer costs accuracy and saves time independently), the cost-aware
    order's largest passing prefix saves more time on average than the least-sensitive-first order's, and
    comes close to the best subset any search could pick (found here by brute force)."""
    import itertools
    import random

    rng = random.Random(7)
    ratios, wins, ties = [], 0, 0
    for _ in range(150):
        names = [f"l{i}" for i in range(10)]
        cost = {n: rng.uniform(0, 0.004) for n in names}
        saving = {n: rng.uniform(0.1, 10.0) for n in names}
        budget = Budget(max_drop=rng.uniform(0.004, 0.02), confidence=0.5)
        evaluate = lambda low: 1.0 - sum(cost[n] for n in low)  # noqa: E731

        def saved(order):
            return sum(saving[n] for n in search(order, evaluate, 1.0, budget, refinement=0).best)

        by_cost, by_sensitivity = saved(cost_aware_order(names, cost, saving)), saved(sorted(names, key=cost.get))
        best = max(sum(saving[n] for n in subset) for k in range(len(names) + 1)
                   for subset in itertools.combinations(names, k) if sum(cost[n] for n in subset) <= budget.max_drop)
        ratios.append(by_cost / best if best else 1.0)
        wins += by_cost > by_sensitivity + 1e-9
        ties += abs(by_cost - by_sensitivity) <= 1e-9
    assert wins > 0.6 * (150 - ties)
    assert statistics.fmean(ratios) > 0.85


def test_layers_that_save_nothing_go_last_whatever_they_cost():
    order = cost_aware_order(["a", "b", "c"], {"a": 0.0, "b": 0.001, "c": 0.0}, {"a": 0.0, "b": 1.0, "c": 2.0})
    assert order[-1] == "a"


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


def test_a_metric_that_is_not_monotone_along_the_order_never_returns_an_unmeasured_or_failing_plan():
    """Real metrics wobble along an order (a top-1 metric moves in whole answers). Whatever the wobble, the
    search may only return a set it measured within budget, and it stays within its evaluation bound."""
    rng = random.Random(3)
    for _ in range(300):
        layers = rng.randint(2, 40)
        order = [f"l{i}" for i in range(layers)]
        wobble = {n: rng.gauss(0, 0.004) for n in order}
        drift = rng.uniform(0, 0.001)
        measured = {}

        def evaluate(low):
            metric = 1.0 - drift * len(low) + sum(wobble[n] for n in low) * rng.choice((0.5, 1.0))
            measured[frozenset(low)] = metric
            return metric

        budget = Budget(0.01, confidence=0.5)
        result = search(order, evaluate, 1.0, budget)
        assert result.evaluations <= max_evaluations(layers, 3)
        if result.best:
            assert budget.accepts(budget.drop(1.0, measured[frozenset(result.best)]))
            assert any(s.accepted and set(s.low(order)) == set(result.best) for s in result.steps)


def test_the_confidence_rule_keeps_a_margin_of_z_standard_errors():
    budget = Budget(0.01, confidence=0.8)
    assert budget.z == pytest.approx(0.8416, abs=1e-4)
    assert budget.accepts(0.008, stderr=0.002) and not budget.accepts(0.009, stderr=0.002)
    assert Budget(0.01, confidence=0.5).accepts(0.0099, stderr=1.0)  # z = 0: the drop alone
    with pytest.raises(ValueError, match="confidence"):
        Budget(0.01, confidence=0.4)
    # Paired over the same samples: one flipped answer in 100 is a drop of 1% with a standard error of 1%.
    drop, stderr = Budget(0.01).paired([1.0] * 100, [1.0] * 99 + [0.0])
    assert drop == pytest.approx(0.01) and stderr == pytest.approx(0.01)


def test_a_larger_confidence_returns_a_prefix_no_larger_on_the_same_measurements():
    """Drops grow along the order with a constant standard error: the stricter rule stops earlier."""
    order = [f"l{i}" for i in range(30)]

    def evaluate(low):
        return Measurement(1.0 - 0.00049 * len(low), stderr=0.002)

    chosen = [len(search(order, evaluate, 1.0, Budget(0.01, confidence=c)).best) for c in (0.5, 0.8, 0.95, 0.99)]
    # the largest k with 0.00049 k + z * 0.002 <= 0.01, for z = 0, 0.84, 1.64, 2.33
    assert chosen == [20, 16, 13, 10]


def test_a_probe_already_measured_is_the_first_step_and_is_not_evaluated_again():
    order = [f"l{i}" for i in range(8)]
    calls = []

    def evaluate(low):
        calls.append(list(low))
        return 1.0 - 0.004 * len(low)

    budget = Budget(0.01, confidence=0.5)
    probe = Step.measured(8, 1.0 - 0.004 * 8, 1.0, budget, stage="probe")
    result = search(order, evaluate, 1.0, budget, probe=probe)
    assert result.steps[0] is probe and order not in calls
    assert result.best == order[:2]
