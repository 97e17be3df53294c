"""What each candidate layer saves on the real kernels, and the plan latency model built from it."""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from .. import cost
from ..latency import Paired, Workload, paired
from ..plan import Plan
from .base import Inputs, hooks, split_item


if TYPE_CHECKING:
    from .base import Backend


@dataclass
class LatencyProfile:
    """What each candidate saves on the real kernels, and a linear prediction of any plan's latency:
    `intercept_ms - slope * sum of the plan's savings`, with the measured baseline as intercept and exact at
    the all-low plan. `additive` says whether layers really save independently (kernels that take and return
    float) or whether a saving depends on the neighbours' precision (static int8), where the prediction is
    only a guide between its two exact ends. Every plan the search times checks it again."""

    method: str
    savings: dict[str, Paired]  # per candidate: its saving (difference_ms) and how noisy that figure is
    baseline_ms: float
    all_low_ms: float
    intercept_ms: float
    slope: float
    additive: bool = True

    def saving(self, name: str) -> float:
        return self.savings[name].difference_ms

    def measurable(self, name: str) -> bool:
        """Whether the layer may save time: everything but a saving that is nil or negative beyond its noise.
        (Requiring a saving to clear its noise kept 26 of EfficientNet-Lite0's 50 layers float, each saving a
        little, and together cost a third of the all-int8 model's speed-up: docs/method.md.)"""
        timing = self.savings[name]
        return timing.difference_ms + timing.noise_ms > 0

    def fastest(self, layer_of: Callable[[str], str]) -> list[str]:
        return fastest_items(self.savings, layer_of)

    def predict_ms(self, low: Iterable[str]) -> float:
        return self.intercept_ms - self.slope * sum(self.saving(n) for n in low)

    def to_dict(self) -> dict:
        return {"method": self.method, "baseline_ms": self.baseline_ms, "all_low_ms": self.all_low_ms,
                "intercept_ms": self.intercept_ms, "slope": self.slope, "additive": self.additive}


def fastest_items(savings: dict[str, Paired], layer_of: Callable[[str], str]) -> list[str]:
    """Each layer's candidate that saves most, where one saves anything (a layer whose every format is slower
    than float has none)."""
    best: dict[str, str] = {}
    for item, timing in savings.items():
        layer = layer_of(item)
        if timing.difference_ms > 0 and (layer not in best or timing.difference_ms > savings[best[layer]].difference_ms):
            best[layer] = item
    return list(best.values())


def rounds_within(call, seconds: float) -> int:
    """Timing rounds (of 3 calls each of two functions) that fit in about `seconds`, 5 to 30."""
    started = time.perf_counter()
    with torch.inference_mode():
        call()
    took = max(time.perf_counter() - started, 1e-6)
    return min(30, max(5, int(seconds / (6 * took))))


def _inputs_in(model, names: list[str], workload: "Workload") -> dict[str, tuple]:
    """The positional inputs each named module receives in one timed call of the workload."""
    call, seen = workload.call(model), {}  # set up first (a decoding step prefills its cache)
    modules = dict(model.named_modules())
    with torch.inference_mode(), hooks([modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: seen.setdefault(n, args)) for n in names]):
        call()
    cost.count("forward", workload.samples)
    return seen


def _anchored(method: str, savings: dict[str, Paired], chosen: list[str], whole: Paired, additive: bool = True
              ) -> LatencyProfile:
    """The profile with its sum over `chosen` scaled to one whole-model timing of the plan they make."""
    total = sum(savings[name].difference_ms for name in chosen)
    return LatencyProfile(method, savings, whole.first_ms, whole.second_ms, intercept_ms=whole.first_ms,
                          slope=whole.difference_ms / total if total > 0 else 1.0, additive=additive)


def independent_profile(backend: "Backend", calibration: list[Inputs], seconds_per_layer: float = 0.5,
                        workload: "Workload | None" = None) -> LatencyProfile:
    """Layers whose kernels take and return float (dynamic int8, torchao) save independently of each other:
    each is timed alone, fp32 module against int8 module on the inputs it receives in one call of the workload,
    and the sum is scaled to one whole-model timing of the all-low plan against the baseline."""
    workload = workload or Workload(calibration[0])
    cuda = calibration[0][0].is_cuda
    low_model = backend.build(backend.all_low(), calibration)
    float_inputs = _inputs_in(backend.adapter, backend.candidates, workload)
    low_inputs = _inputs_in(low_model, backend.candidates, workload)
    float_modules, low_modules = dict(backend.adapter.named_modules()), dict(low_model.named_modules())
    # Each layer's timing counts as the samples of the call whose inputs it replays.
    savings = {n: paired(lambda n=n: float_modules[n](*float_inputs[n]),
                         lambda n=n: low_modules[n](*low_inputs[n]), cuda=cuda, samples=workload.samples,
                         rounds=rounds_within(lambda n=n: float_modules[n](*float_inputs[n]), seconds_per_layer))
               for n in backend.candidates}
    whole = paired(workload.call(backend.baseline), workload.call(low_model), rounds=7, inner=1, cuda=cuda,
                   samples=workload.samples)
    return _anchored("each layer's fp32 and int8 modules timed alone on its captured inputs, interleaved; their "
                     "sum scaled to one whole-model timing of the all-low plan", savings, backend.candidates, whole)


# A model's call reads each layer's weights once, so they are not in cache when it runs (a decoding step reads
# SmolLM2's 540 MB of weights per token). A shape timed over and over on one weight would run from cache: on an
# AMX Xeon a 576x576 fp32 layer then looked as fast as its int4 kernel at one row, while in the model int4 made
# decoding 1.9x faster. So each shape is timed over distinct copies of its weights, used in turn, as many as the
# model's own working set (capped).
COLD_BYTES_CAP = 256 * 2**20


def in_turn(modules: list) -> Callable:
    """A call of the next module of `modules` each time, so consecutive calls read different weights."""
    turn = itertools.cycle(modules)
    return lambda x: next(turn)(x)


def copies_for(weight_bytes: int, working_set_bytes: int) -> int:
    """How many distinct copies of a weight make timing it read as many bytes as the model does (at least 1)."""
    return max(1, math.ceil(min(working_set_bytes, COLD_BYTES_CAP) / max(weight_bytes, 1)))


def shared_shape_profile(backend: "Backend", calibration: list[Inputs], seconds_per_layer: float = 0.5,
                         workload: "Workload | None" = None) -> LatencyProfile:
    """Many layers, several formats each, few distinct shapes (a transformer's blocks repeat): each distinct
    (weight shape, bias, format) is timed once, float modules against low modules on random input of the
    workload's rows, interleaved, each side cycling through copies of the weights as large as the model's
    working set (its weights are cold in a real call); layers of that shape share the figure. The sum over each
    layer's fastest format is scaled to one whole-model timing of that plan against the baseline."""
    workload = workload or Workload(calibration[0])
    modules = dict(backend.adapter.named_modules())
    layers = {split_item(item)[0] for item in backend.candidates}
    working_set = sum(modules[layer].weight.numel() * modules[layer].weight.element_size() for layer in layers)
    timed: dict[tuple, Paired] = {}
    by_shape: dict[tuple, list[str]] = {}  # items grouped by (weight shape, bias): one set of float copies each
    for item in backend.candidates:
        linear = modules[split_item(item)[0]]
        by_shape.setdefault((tuple(linear.weight.shape), linear.bias is not None), []).append(item)
    with torch.inference_mode():
        for shape, items in by_shape.items():
            linear = modules[split_item(items[0])[0]]
            copies = copies_for(linear.weight.numel() * linear.weight.element_size(), working_set)
            floats = [copy.deepcopy(linear) for _ in range(copies)]  # freed before the next shape's
            x = torch.randn(workload.rows, linear.in_features, generator=torch.Generator().manual_seed(0))
            for precision in dict.fromkeys(split_item(item)[1] for item in items):
                float_call, low_call = in_turn(floats), in_turn([backend.low_module(f, precision) for f in floats])
                timed[(*shape, precision)] = paired(
                    lambda: float_call(x), lambda: low_call(x), samples=workload.samples,
                    rounds=rounds_within(lambda: float_call(x), seconds_per_layer))
    savings = {}
    for item in backend.candidates:
        linear = modules[split_item(item)[0]]
        savings[item] = timed[(tuple(linear.weight.shape), linear.bias is not None, split_item(item)[1])]
    chosen = fastest_items(savings, lambda item: split_item(item)[0])
    plan_model = backend.build(Plan(layers=backend.assignment(chosen), backend=backend.name), calibration)
    whole = paired(workload.call(backend.baseline), workload.call(plan_model), rounds=7, inner=1,
                   samples=workload.samples)
    return _anchored(f"each distinct weight shape and format timed once ({len(timed)} pairs), float against low on "
                     f"{workload.rows} input row(s) as in one {workload.name} call, interleaved, each side cycling "
                     f"through copies of its weights as large as the model's weights (cold, as in a real call; up "
                     f"to {COLD_BYTES_CAP >> 20} MiB); the sum over each layer's fastest format scaled to one "
                     "whole-model timing of that plan", savings, chosen, whole)


def leave_one_out(baseline, all_low, example: Inputs, names: list[str], seconds_per_layer: float, method: str,
                  pair: Callable[[str, int], Paired]) -> LatencyProfile:
    """Layers whose saving depends on their neighbours (static int8, any plan in onnxruntime) are timed in
    context: `pair(name, rounds)` times the all-low model with `name` alone float against the all-low model, in
    interleaved rounds. The model is anchored at both measured ends, the baseline and the all-low model; in
    between it is not additive, and only the ends are exact."""
    batch = len(example[0])
    whole = paired(lambda: baseline(*example), lambda: all_low(*example), rounds=7, inner=1, samples=batch)
    rounds = min(30, max(5, int(seconds_per_layer * 500 / max(whole.second_ms, 1e-3))))
    savings = {name: pair(name, rounds) for name in names}
    return _anchored(method + "; scaled so that the baseline and the all-low model are predicted exactly",
                     savings, names, whole, additive=False)
