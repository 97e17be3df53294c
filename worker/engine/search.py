"""Which layers go low precision: an order, a bisection over its prefixes, and a short refinement.

Pure logic with no torch. `cost_aware_order` ranks layers by accuracy cost per unit of latency saved
(a greedy knapsack); `bisect_layers` finds the largest prefix of an order whose measured metric is within
budget, in at most ceil(log2(L + 1)) + 2 evaluations, assuming the metric falls (roughly) monotonically
along the order; `search` adds up to `REFINEMENT_STEPS` evaluations that skip the first failing layer and
try the next ones (as NNCF's accuracy control does), and records every evaluated point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


BUDGET_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class Budget:
    """The user's degradation range: accept a drop <= max_drop; a drop >= min_drop is close enough to stop.

    Drops are relative to the baseline (0.01 = 1% of the baseline metric) in mode "relative", metric
    points in mode "absolute".
    """

    max_drop: float
    min_drop: float = 0.0
    mode: str = "relative"

    def __post_init__(self) -> None:
        if self.mode not in BUDGET_MODES:
            raise ValueError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got {self.mode!r}")
        if not 0 < self.max_drop < 1:
            raise ValueError(f"budget must be in (0, 1), got {self.max_drop}")
        if not 0 <= self.min_drop <= self.max_drop:
            raise ValueError(f"min_drop must be in [0, max_drop={self.max_drop}], got {self.min_drop}")

    def drop(self, baseline: float, metric: float) -> float:
        absolute = baseline - metric
        if self.mode == "absolute":
            return absolute
        return absolute / abs(baseline) if baseline else absolute

    def accepts(self, drop: float) -> bool:
        return drop <= self.max_drop

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
    stage: str = "bisection"  # or "refinement"
    skipped: list[str] = field(default_factory=list)

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


def bisect_layers(
    num_layers: int,
    evaluate: Callable[[int], float],
    baseline: float,
    budget: Budget,
    on_step: Callable[[Step, int], None] | None = None,
) -> SearchResult:
    """Find the largest k in [1, num_layers] whose metric is within budget.

    Order of evaluations: k = L (all low: done if it passes), k = 1 (if it fails nothing fits),
    then bisection between the largest known-good and smallest known-bad k.
    `on_step(step, max_evaluations)` is called after every evaluation.
    """
    if num_layers < 1:
        raise ValueError("nothing to search: the model has no quantizable layers")
    result = SearchResult(best_k=0)
    cap = max_evaluations(num_layers)

    def measure(k: int) -> Step:
        metric = evaluate(k)
        drop = budget.drop(baseline, metric)
        step = Step(k=k, metric=metric, drop=drop, accepted=budget.accepts(drop))
        result.steps.append(step)
        if on_step:
            on_step(step, cap)
        return step

    top = measure(num_layers)
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
    evaluate: Callable[[list[str]], float],
    baseline: float,
    budget: Budget,
    on_step: Callable[[Step, list[str], int], None] | None = None,
    refinement: int = REFINEMENT_STEPS,
) -> SearchResult:
    """Bisect over the prefixes of `order`, then refine near the boundary: skip the first failing layer and
    try adding the next ones, one real evaluation each, at most `refinement` of them.

    `evaluate(low)` measures the metric with exactly `low` in low precision; `on_step(step, low, cap)` is
    called after every evaluation.
    """
    cap = max_evaluations(len(order), refinement)

    def notify(step: Step, low: list[str]) -> None:
        if on_step:
            on_step(step, low, cap)

    result = bisect_layers(len(order), lambda k: evaluate(order[:k]), baseline, budget,
                           on_step=lambda step, _cap: notify(step, order[:step.k]))
    best = order[:result.best_k]
    passing = [s for s in result.steps if s.accepted]
    settled = result.status == "all_low" or any(budget.close_enough(s.drop) for s in passing)
    if not settled and refinement:
        skipped = [order[result.best_k]]  # the first failing layer
        for name in order[result.best_k + 1:result.best_k + 1 + refinement]:
            trial = best + [name]
            metric = evaluate(trial)
            drop = budget.drop(baseline, metric)
            step = Step(k=len(trial), metric=metric, drop=drop, accepted=budget.accepts(drop),
                        stage="refinement", skipped=list(skipped))
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
