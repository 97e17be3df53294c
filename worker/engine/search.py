"""Bisection over the sensitivity ordering: the largest k low-precision layers within the budget.

Pure logic with no torch: `evaluate(k)` is whatever measures the metric with the k least sensitive
layers in low precision. The search assumes the metric falls (roughly) monotonically with k and
spends at most ceil(log2(L + 1)) + 2 evaluations.
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


@dataclass
class Step:
    k: int
    metric: float
    drop: float
    accepted: bool
    latency_ms: float | None = None
    chosen: bool = False


@dataclass
class SearchResult:
    best_k: int  # 0 means no low-precision layer fits the budget
    steps: list[Step] = field(default_factory=list)
    status: str = "ok"  # ok | all_low | none_fit

    @property
    def evaluations(self) -> int:
        return len(self.steps)


def max_evaluations(num_layers: int) -> int:
    return math.ceil(math.log2(num_layers + 1)) + 2


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
