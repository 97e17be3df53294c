"""Per-layer sensitivity: a Hessian term augmented with measured inter-layer dependencies.

See docs/method.md for the definitions and why. In short, for each candidate layer i:
- hessian term    Omega_i = Tr(H_i) / n_i * ||Q(W_i) - W_i||^2            (HAWQ-V2, Hutchinson trace)
- dependency term D_i, measured with every other layer's quantization in play:
    conditional   D_i = L(S) - L(S minus i)          S = all candidates quantized (leave-one-out)
    pairwise      D_i = [L({i}) - L({})] + 1/2 sum_{j neighbour of i} [L({i,j}) - L({i}) - L({j}) + L({})]
- score           s_i = (1 - w) * Omega_i / sum|Omega| + w * D_i / sum|D|   (each term as a share of its total)
Layers are ordered by ascending score: the least sensitive go to low precision first.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from .adapters import quantizable_layers
from .evaluation import Evaluator
from .hessian import HessianTrace
from .quantize import fake_quantize_weight, simulated

ORDERINGS = ("augmented", "hessian", "random")
INTERLAYER = ("conditional", "pairwise")

Progress = Callable[[float, str], None]


@dataclass
class SensitivityOptions:
    ordering: str = "augmented"
    interlayer: str = "conditional"
    interlayer_weight: float = 0.5
    hutchinson_max_samples: int = 16
    hutchinson_min_samples: int = 4
    hutchinson_tol: float = 0.1
    hessian_batches: int = 2
    interlayer_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}")
        if self.interlayer not in INTERLAYER:
            raise ValueError(f"interlayer must be one of {', '.join(INTERLAYER)}")
        if not 0 <= self.interlayer_weight <= 1:
            raise ValueError("interlayer_weight must be in [0, 1]")


@dataclass
class LayerSensitivity:
    name: str
    kind: str
    params: int
    quant_error: float  # ||Q(W) - W||^2
    hessian_trace: float | None = None
    trace_stderr: float | None = None
    hessian_term: float | None = None
    interlayer: float | None = None
    score: float | None = None
    hessian_part: float | None = None  # the two weighted shares that add up to `score`
    interlayer_part: float | None = None
    rank: int = 0  # 0 = least sensitive = first to go to low precision

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sensitivity:
    layers: list[LayerSensitivity]  # network order
    ordering: list[str]  # least sensitive first
    method: dict = field(default_factory=dict)

    @classmethod
    def from_report(cls, report: dict) -> "Sensitivity":
        """The analysis stored in a report, for a warm start on the same model revision and data."""
        names = {f for f in LayerSensitivity.__dataclass_fields__}
        layers = [LayerSensitivity(**{k: v for k, v in layer.items() if k in names}) for layer in report["layers"]]
        ordering = [layer.name for layer in sorted(layers, key=lambda l: l.rank)]
        return cls(layers=layers, ordering=ordering, method={**report["search"]["method"], "reused": True})


def _normalised(values: list[float]) -> list[float]:
    total = sum(abs(v) for v in values)
    return [v / total if total else 0.0 for v in values]


def hessian_traces(adapter: nn.Module, evaluator: Evaluator, names: list[str], options: SensitivityOptions):
    layers = quantizable_layers(adapter)
    weights = {n: layers[n].weight for n in names}
    wanted = {id(w) for w in weights.values()}
    flags = {p: p.requires_grad for p in adapter.parameters()}
    for p in flags:  # differentiate only through the candidate weights: cheaper double backward
        p.requires_grad_(id(p) in wanted)
    try:
        estimator = HessianTrace(lambda: evaluator.loss(adapter, options.hessian_batches), weights, seed=options.seed)
        return estimator.trace(options.hutchinson_max_samples, options.hutchinson_min_samples, options.hutchinson_tol)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


class LossProbe:
    """Simulated-quantization loss of layer subsets on the calibration batches, memoised."""

    def __init__(self, adapter: nn.Module, evaluator: Evaluator, batches: int):
        self.adapter, self.evaluator, self.batches = adapter, evaluator, batches
        self.layers = quantizable_layers(adapter)
        self.cache: dict[frozenset, float] = {}

    def __call__(self, subset) -> float:
        key = frozenset(subset)
        if key not in self.cache:
            with simulated(self.adapter, key, self.layers):
                self.cache[key] = self.evaluator.loss_value(self.adapter, self.batches)
        return self.cache[key]


def conditional_terms(probe: LossProbe, names: list[str], progress: Progress) -> list[float]:
    everything = probe(names)
    terms = []
    for i, name in enumerate(names):
        terms.append(everything - probe(set(names) - {name}))
        progress((i + 1) / len(names), f"leave-one-out {i + 1}/{len(names)}")
    return terms


def pairwise_terms(probe: LossProbe, names: list[str], progress: Progress) -> list[float]:
    none = probe(())
    isolated = []
    for i, name in enumerate(names):
        isolated.append(probe({name}) - none)
        progress((i + 1) / (2 * len(names)), f"single layer {i + 1}/{len(names)}")
    terms = list(isolated)
    for i in range(len(names) - 1):
        interaction = probe({names[i], names[i + 1]}) - none - isolated[i] - isolated[i + 1]
        terms[i] += interaction / 2
        terms[i + 1] += interaction / 2
        progress(0.5 + (i + 1) / (2 * len(names)), f"neighbour pair {i + 1}/{len(names) - 1}")
    return terms


def analyse(adapter: nn.Module, evaluator: Evaluator, names: list[str], options: SensitivityOptions,
            progress: Progress = lambda f, m: None) -> Sensitivity:
    """Score and order the candidate layers `names` (network order)."""
    modules = quantizable_layers(adapter)
    layers = [
        LayerSensitivity(
            name=n, kind=type(modules[n]).__name__, params=modules[n].weight.numel(),
            quant_error=float((fake_quantize_weight(modules[n].weight) - modules[n].weight.detach()).pow(2).sum()),
        )
        for n in names
    ]
    method: dict = {"ordering": options.ordering}
    if options.ordering == "random":
        order = list(names)
        random.Random(options.seed).shuffle(order)
        return _ranked(layers, order, method)

    progress(0.0, "Hessian traces (Hutchinson)")
    probe = LossProbe(adapter, evaluator, options.interlayer_batches)
    try:
        traces = hessian_traces(adapter, evaluator, names, options)
    except RuntimeError as exc:  # e.g. an op without double backward
        method["hessian"] = f"gradient-free proxy (measured single-layer loss increase): {str(exc)[:200]}"
        none = probe(())
        for layer in layers:
            layer.hessian_term = probe({layer.name}) - none
    else:
        method["hessian"] = "hutchinson"
        method["hutchinson_samples"] = max(t.samples for t in traces.values())
        for layer in layers:
            estimate = traces[layer.name]
            layer.hessian_trace, layer.trace_stderr = estimate.mean, estimate.stderr
            layer.hessian_term = estimate.mean / layer.params * layer.quant_error
    progress(0.5, "inter-layer dependencies")

    hessian_share = _normalised([layer.hessian_term for layer in layers])
    if options.ordering == "hessian":
        parts = [(h, 0.0) for h in hessian_share]
    else:
        measure = conditional_terms if options.interlayer == "conditional" else pairwise_terms
        terms = measure(probe, names, lambda f, m: progress(0.5 + 0.5 * f, m))
        for layer, term in zip(layers, terms):
            layer.interlayer = term
        method.update(interlayer=options.interlayer, interlayer_weight=options.interlayer_weight)
        w = options.interlayer_weight
        parts = [((1 - w) * h, w * d) for h, d in zip(hessian_share, _normalised(terms))]
    method["loss_evaluations"] = len(probe.cache)
    for layer, (hessian_part, interlayer_part) in zip(layers, parts):
        layer.hessian_part, layer.interlayer_part = hessian_part, interlayer_part
        layer.score = hessian_part + interlayer_part
    order = [layer.name for layer in sorted(layers, key=lambda l: l.score)]
    return _ranked(layers, order, method)


def _ranked(layers: list[LayerSensitivity], order: list[str], method: dict) -> Sensitivity:
    rank = {name: i for i, name in enumerate(order)}
    for layer in layers:
        layer.rank = rank[layer.name]
    return Sensitivity(layers=layers, ordering=order, method=method)

