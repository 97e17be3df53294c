"""Which layers go low precision: an order, a bisection over its prefixes, and a short refinement.

Pure logic with no torch. `cost_aware_order` ranks layers by accuracy cost per unit of latency saved
(a greedy knapsack); `bisect_layers` finds the largest prefix of an order whose measured metric is within
budget, in at most ceil(log2(L + 1)) + 2 evaluations, assuming the metric falls (roughly) monotonically
along the order; `search` adds up to `REFINEMENT_STEPS` evaluations that skip the first failing layer and
try the next ones (as NNCF's accuracy control does), and records every evaluated point.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence


BUDGET_MODES = ("relative", "absolute", "perplexity")
# The default one-sided confidence that a plan's drop on new data stays within the budget: chosen by
# measurement (bench/confidence.py, docs/method.md).
DEFAULT_CONFIDENCE = 0.9


@dataclass(frozen=True)
class Measurement:
    """A plan's metric on the evaluation split, and the standard error of its drop from the baseline (paired
    over the same samples, in the budget's units)."""

    metric: float
    stderr: float = 0.0


@dataclass(frozen=True)
class Budget:
    """The user's degradation range: accept a plan whose drop, plus z standard errors, is at most max_drop
    (z for a one-sided `confidence`: 0.5 gives z = 0, the drop itself); a drop >= min_drop is close enough to
    stop.

    Drops are relative to the baseline (0.01 = 1% of the baseline metric) in mode "relative", metric
    points in mode "absolute", and in mode "perplexity" (the metric a mean log-likelihood per token) the
    relative increase of perplexity exp(-metric): exp(baseline - metric) - 1.
    """

    max_drop: float
    min_drop: float = 0.0
    mode: str = "relative"
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if self.mode not in BUDGET_MODES:
            raise ValueError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got {self.mode!r}")
        if not 0 < self.max_drop < 1:
            raise ValueError(f"budget must be in (0, 1), got {self.max_drop}")
        if not 0 <= self.min_drop <= self.max_drop:
            raise ValueError(f"min_drop must be in [0, max_drop={self.max_drop}], got {self.min_drop}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")

    @property
    def z(self) -> float:
        return statistics.NormalDist().inv_cdf(self.confidence)

    def drop(self, baseline: float, metric: float) -> float:
        absolute = baseline - metric
        if self.mode == "perplexity":
            return math.expm1(absolute)
        if self.mode == "absolute":
            return absolute
        return absolute / abs(baseline) if baseline else absolute

    def paired(self, baseline: Sequence[float], scores: Sequence[float]) -> tuple[float, float]:
        """The drop of `scores` from `baseline` (per-sample metrics of the same samples) and its standard
        error: the differences' standard deviation over sqrt(n), in the budget's units."""
        differences = [b - s for b, s in zip(baseline, scores, strict=True)]
        mean_baseline = statistics.fmean(baseline)
        stderr = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else 0.0
        drop = self.drop(mean_baseline, statistics.fmean(scores))
        if self.mode == "perplexity":  # delta method: d expm1(x) / dx = 1 + drop
            return drop, stderr * (1 + drop)
        scale = abs(mean_baseline) if self.mode == "relative" and mean_baseline else 1.0
        return drop, stderr / scale

    def bound(self, drop: float, stderr: float = 0.0) -> float:
        """The drop the acceptance rule checks: the point estimate plus z standard errors."""
        return drop + self.z * stderr

    def accepts(self, drop: float, stderr: float = 0.0) -> bool:
        return self.bound(drop, stderr) <= self.max_drop

    def interval(self, drop: float, stderr: float, confidence: float = 0.95) -> tuple[float, float]:
        """A two-sided interval for a drop (the final plan's on the test split)."""
        half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) * stderr
        return drop - half, drop + half

    def close_enough(self, drop: float) -> bool:
        """Within the lower edge of the range: no need to search for a larger k."""
        return self.min_drop > 0 and self.min_drop <= drop <= self.max_drop


SELECTIONS = ("cost-aware", "sensitivity")
REFINEMENT_STEPS = 3


@dataclass
class Step:
    k: int  # layers in low precision: the first k + len(skipped) of the order, less `skipped`
    metric: float
    drop: float
    accepted: bool
    latency_ms: float | None = None
    predicted_latency_ms: float | None = None
    chosen: bool = False
    stage: str = "bisection"  # "probe" (every eligible layer, before any analysis), or "refinement"
    skipped: list[str] = field(default_factory=list)
    stderr: float = 0.0  # of the drop, paired over the evaluation samples
    bound: float = 0.0  # drop + z * stderr: what the budget was checked against

    @classmethod
    def measured(cls, k: int, measurement: "Measurement | float", baseline: float, budget: Budget,
                 **fields) -> "Step":
        if not isinstance(measurement, Measurement):
            measurement = Measurement(measurement)
        drop = budget.drop(baseline, measurement.metric)
        return cls(k=k, metric=measurement.metric, drop=drop, accepted=budget.accepts(drop, measurement.stderr),
                   stderr=measurement.stderr, bound=budget.bound(drop, measurement.stderr), **fields)

    def low(self, order: list[str]) -> list[str]:
        """The layers this step put in low precision."""
        return [n for n in order[:self.k + len(self.skipped)] if n not in set(self.skipped)]


@dataclass
class SearchResult:
    best_k: int  # 0 means no low-precision layer fits the budget
    steps: list[Step] = field(default_factory=list)
    status: str = "ok"  # ok | all_low | none_fit
    best: list[str] = field(default_factory=list)  # the largest passing set found

    @property
    def evaluations(self) -> int:
        return len(self.steps)


def max_evaluations(num_layers: int, refinement: int = 0) -> int:
    return math.ceil(math.log2(num_layers + 1)) + 2 + refinement


def cost_aware_order(names: list[str], cost: dict[str, float], saving: dict[str, float]) -> list[str]:
    """Least accuracy cost per millisecond saved first. Layers that cost nothing (or gain accuracy) come
    first, biggest saving first; layers that save nothing come last. Savings add up (the latency models
    are linear in the plan), so this greedy is the knapsack's ratio rule."""

    def key(name: str):
        c, s = cost[name], saving[name]
        if s <= 0:
            return (2, c, name)
        return (0, -s, name) if c <= 0 else (1, c / s, name)

    return sorted(names, key=key)


def frontier_order(layers: dict[str, list[str]], cost: dict[str, float], saving: dict[str, float]) -> list[str]:
    """Several formats per layer (the knapsack with several items per layer): each layer's items on the lower
    convex hull of (saving, cost) from (0, 0), taken as upgrades (from float, or from the layer's previous hull
    item) and merged across layers by marginal cost per millisecond saved. Applying a prefix gives each layer
    its last item in it. Items off the hull, or saving nothing, are left out: whatever saving such an item
    offers, hull items give for less cost. With one item per layer this is `cost_aware_order`'s ratio rule."""
    upgrades = []
    for layer, items in layers.items():
        points = [item for item in items if saving[item] > 0]
        at_saving = at_cost = 0.0
        while points:
            slope, _, best = min(((cost[i] - at_cost) / (saving[i] - at_saving), -saving[i], i) for i in points)
            upgrades.append((slope, best))
            at_saving, at_cost = saving[best], cost[best]
            points = [item for item in points if saving[item] > at_saving]
    # Stable: a layer's upgrades keep their order (along a lower hull the slopes never decrease).
    return [item for _, item in sorted(upgrades, key=lambda upgrade: upgrade[0])]


def bisect_layers(
    num_layers: int,
    evaluate: Callable[[int], Measurement | float],
    baseline: float,
    budget: Budget,
    on_step: Callable[[Step, int], None] | None = None,
    probe: Step | None = None,
) -> SearchResult:
    """Find the largest k in [1, num_layers] whose metric is within budget.

    Order of evaluations: k = L (all low: done if it passes), k = 1 (if it fails nothing fits),
    then bisection between the largest known-good and smallest known-bad k.
    `on_step(step, max_evaluations)` is called after every evaluation. `probe`, when given, is the k = L
    step already measured (before any analysis), so it is not evaluated again.
    """
    if num_layers < 1:
        raise ValueError("nothing to search: the model has no quantizable layers")
    result = SearchResult(best_k=0)
    cap = max_evaluations(num_layers)

    def measure(k: int) -> Step:
        step = Step.measured(k, evaluate(k), baseline, budget)
        result.steps.append(step)
        if on_step:
            on_step(step, cap)
        return step

    if probe is not None:
        result.steps.append(probe)
    top = probe or measure(num_layers)
    if top.accepted:
        result.best_k, result.status = num_layers, "all_low"
        return result
    if num_layers == 1:
        result.status = "none_fit"
        return result
    first = measure(1)
    if not first.accepted:
        result.status = "none_fit"
        return result
    good, bad = 1, num_layers
    if budget.close_enough(first.drop):
        result.best_k = good
        return result
    while bad - good > 1:
        mid = (good + bad) // 2
        step = measure(mid)
        if step.accepted:
            good = mid
            if budget.close_enough(step.drop):
                break
        else:
            bad = mid
    result.best_k = good
    return result


def search(
    order: list[str],
    evaluate: Callable[[list[str]], Measurement | float],
    baseline: float,
    budget: Budget,
    on_step: Callable[[Step, list[str], int], None] | None = None,
    refinement: int = REFINEMENT_STEPS,
    probe: Step | None = None,
) -> SearchResult:
    """Bisect over the prefixes of `order`, then refine near the boundary: skip the first failing layer and
    try adding the next ones, one real evaluation each, at most `refinement` of them.

    `evaluate(low)` measures the metric with exactly `low` in low precision; `on_step(step, low, cap)` is
    called after every evaluation; `probe` is the all-of-`order` step if it was measured already.
    """
    cap = max_evaluations(len(order), refinement)

    def notify(step: Step, low: list[str]) -> None:
        if on_step:
            on_step(step, low, cap)

    result = bisect_layers(len(order), lambda k: evaluate(order[:k]), baseline, budget,
                           on_step=lambda step, _cap: notify(step, order[:step.k]), probe=probe)
    best = order[:result.best_k]
    passing = [s for s in result.steps if s.accepted]
    settled = result.status == "all_low" or any(budget.close_enough(s.drop) for s in passing)
    if not settled and refinement:
        skipped = [order[result.best_k]]  # the first failing layer
        for name in order[result.best_k + 1:result.best_k + 1 + refinement]:
            trial = best + [name]
            step = Step.measured(len(trial), evaluate(trial), baseline, budget, stage="refinement",
                                 skipped=list(skipped))
            result.steps.append(step)
            notify(step, trial)
            if step.accepted:
                best = trial
            else:
                skipped.append(name)
    result.best, result.best_k = best, len(best)
    if result.status == "none_fit" and best:
        result.status = "ok"
    return result
