"""Per-layer sensitivity: a Hessian term augmented with measured inter-layer dependencies.

See docs/method.md for the definitions and why. In short, for each candidate layer i with output y_i:
- hessian term    Omega_i = 1/2 * Tr(d²L/dy_i²) / n_i * ||y_i~ - y_i||²
                  the output-space (activation-aware) form of HAWQ-V2: the trace of the loss Hessian
                  with respect to the layer's output, times the squared error the layer's kernel makes
                  there (weights *and* inputs quantized, as the kernel does), per element; summed over
                  every output the layer's weight makes (a tied output head's is also the embedding lookup's).
- dependency term D_i, measured with every other layer's quantization in play:
    conditional   D_i = L(S) - L(S minus i)          S = all candidates quantized (leave-one-out)
    pairwise      D_i = [L({i}) - L({})] + 1/2 sum_{j neighbour of i} [L({i,j}) - L({i}) - L({j}) + L({})]
- score           s_i = (1 - w) * Omega_i / sum|Omega| + w * D_i / sum|D|   (each term as a share of its total)
Layers are ordered by ascending score: the least sensitive go to low precision first. Every loss L(S)
comes from the backend's simulation, which reproduces its kernels' arithmetic.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from . import cost
from .adapters import eager_attention
from .evaluation import Evaluator
from .hessian import Blocks, GaussNewtonTrace, HessianTrace, TraceEstimate
from .kernels import Simulation, hooks, weighted
from .sizing import HESSIAN_BATCHES

ORDERINGS = ("augmented", "hessian", "random")
# What labelled classifiers' layers are scored on: KL to the fp32 model's predictions (Gauss-Newton), or the
# cross-entropy with the labels (Hutchinson). Unlabelled data always uses its fidelity loss.
ANALYSIS_LOSSES = ("fidelity", "task")
INTERLAYER = ("conditional", "pairwise")
GAUSS_NEWTON = "gauss-newton"
HUTCHINSON = "hutchinson"

Progress = Callable[[float, str], None]


@dataclass
class SensitivityOptions:
    ordering: str = "augmented"
    interlayer: str = "conditional"
    interlayer_weight: float = 0.5
    hutchinson_max_samples: int = 16
    hutchinson_min_samples: int = 4
    hutchinson_tol: float = 0.1
    hessian_batches: int = HESSIAN_BATCHES
    interlayer_batches: int = 4
    seed: int = 0
    loss: str = "fidelity"

    def __post_init__(self) -> None:
        if self.loss not in ANALYSIS_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(ANALYSIS_LOSSES)}")
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
    output_error: float | None = None  # ||y~ - y||² of the layer's output under its kernel, over the probe batches
    hessian_trace: float | None = None  # Tr(d²L/dy²) over the same batches
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
    warnings: list[str] = field(default_factory=list)

    @property
    def scored(self) -> bool:
        """Whether the layers were scored (the analysis ran): an unscored one keeps network order."""
        return any(layer.score is not None for layer in self.layers)

    @classmethod
    def from_report(cls, report: dict) -> "Sensitivity | None":
        """The analysis stored in a report, for a warm start on the same model revision and data; None when
        that job needed none."""
        names = set(LayerSensitivity.__dataclass_fields__)
        layers = [LayerSensitivity(**{k: v for k, v in layer.items() if k in names}) for layer in report["layers"]]
        ordering = [layer.name for layer in sorted(layers, key=lambda l: l.rank)]
        analysis = cls(layers=layers, ordering=ordering, method={**report["search"]["method"], "reused": True})
        return analysis if analysis.scored or analysis.method.get("ordering") == "random" else None


def _normalised(values: list[float]) -> list[float]:
    total = sum(abs(v) for v in values)
    return [v / total if total else 0.0 for v in values]


class OutputProbes:
    """Zero tensors added to each layer's output, one per batch: derivatives of the loss with respect to
    them are derivatives with respect to the layer outputs, and they are independent leaves, so one
    random probe estimates every layer's output-Hessian trace at once."""

    def __init__(self, modules: dict[str, nn.Module], model: nn.Module, batches: list[tuple[torch.Tensor, ...]]):
        self.modules, self.model, self.batches = modules, model, batches
        self.samples = sum(len(inputs[0]) for inputs in batches)
        cost.count("simulated", self.samples)
        self.deltas: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.batch = 0
        with torch.no_grad(), hooks([m.register_forward_hook(self._shape(n)) for n, m in modules.items()]):
            for index, inputs in enumerate(batches):
                self.batch = index
                model(*inputs)

    def _shape(self, name: str):
        def hook(_module, _args, out):
            self.deltas[name].append(torch.zeros_like(out, requires_grad=True))
        return hook

    @property
    def blocks(self) -> Blocks:
        return self.deltas

    @contextlib.contextmanager
    def active(self):
        def add(name):
            return lambda _module, _args, out: out + self.deltas[name][self.batch]

        with hooks([m.register_forward_hook(add(n)) for n, m in self.modules.items()]):
            yield

    def outputs(self):
        """The model's output on each probe batch, with the probes in the graph."""
        cost.count("simulated", self.samples)
        with self.active():
            for index, inputs in enumerate(self.batches):
                self.batch = index
                yield index, self.model(*inputs)


@contextlib.contextmanager
def _no_weight_gradients(model: nn.Module):
    """Derivatives are taken with respect to the output probes only: weights need none."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _charged(traces: dict[str, TraceEstimate], samples: int, backward_per_sample: int) -> dict[str, TraceEstimate]:
    """Charge the backward passes of the probes drawn (a Hessian-vector product is two) to the cost ledger."""
    drawn = max((t.samples for t in traces.values()), default=0)
    cost.count("backward", drawn * samples * backward_per_sample)
    return traces


def output_traces(simulation: Simulation, evaluator: Evaluator, names: list[str], options: SensitivityOptions,
                  adapter: nn.Module) -> tuple[dict[str, TraceEstimate], str, list[str]]:
    """Tr(d²L/dy²) for every output y a candidate changes (keyed as the simulation's `probes` name them: a layer's
    output by the layer), with how it was computed and any warnings.

    Fidelity losses: the Gauss-Newton trace, exact at the fp32 weights (one ordinary backward per sample).
    Labelled losses: Hutchinson's Hessian-vector products (double backward, eager attention while it runs);
    if the model has no double backward, the Gauss-Newton (Fisher) trace of the cross-entropy, with a warning.
    """
    batches = evaluator.batches("calibration", options.hessian_batches)
    # One probe per output, however many candidates (a layer's formats) change it.
    modules = {probe: module for n in names for probe, module in simulation.probes(n).items()}
    caps = (options.hutchinson_max_samples, options.hutchinson_min_samples, options.hutchinson_tol)
    with _no_weight_gradients(simulation.model), torch.enable_grad():
        probes = OutputProbes(modules, simulation.model, batches)

        def gauss_newton():
            # The fp32 outputs the probe is drawn from, computed before the probes hook the model that makes them.
            evaluator.reference["calibration"]
            scale = len(batches) ** -0.5  # L is the mean of the batch losses

            def projection(generator):
                return sum((out.float() * evaluator.curvature_probe(i, scale, generator)).sum()
                           for i, out in probes.outputs())
            return _charged(GaussNewtonTrace(projection, probes.blocks, seed=options.seed).trace(*caps),
                            probes.samples, backward_per_sample=1)

        if evaluator.fidelity:
            return gauss_newton(), GAUSS_NEWTON, []

        def loss():
            return sum(evaluator.loss_of_output(out, i) for i, out in probes.outputs()) / len(batches)

        try:
            with eager_attention(adapter):
                traces = HessianTrace(loss, probes.blocks, seed=options.seed).trace(*caps)
                return _charged(traces, probes.samples, backward_per_sample=2), HUTCHINSON, []
        except RuntimeError as exc:  # an op without double backward
            warning = (f"Hessian-vector products failed ({str(exc)[:160]}); the Hessian term uses the Gauss-Newton "
                       "(Fisher) approximation of the cross-entropy Hessian instead")
            return gauss_newton(), f"{GAUSS_NEWTON} (fallback)", [warning]


class LossProbe:
    """Simulated-kernel loss of layer subsets on the first `batches` calibration batches, memoised per batch, so
    that using one more batch costs only that batch."""

    def __init__(self, simulation: Simulation, evaluator: Evaluator, batches: int):
        self.simulation, self.evaluator, self.batches = simulation, evaluator, batches
        self.cache: dict[tuple[frozenset, int], float] = {}

    def __call__(self, subset) -> float:
        key = frozenset(subset)
        n = self.evaluator.calibration_batches(self.batches)
        missing = [index for index in range(n) if (key, index) not in self.cache]
        if missing:
            with self.simulation.quantized(key), torch.no_grad():
                for index in missing:
                    self.cache[key, index] = float(self.evaluator.batch_loss(self.simulation.model, index))
            calibration = self.evaluator.data.calibration
            cost.count("simulated", sum(len(next(iter(calibration[index].values()))) for index in missing))
        return sum(self.cache[key, index] for index in range(n)) / n

    @property
    def evaluations(self) -> int:
        """Distinct subsets whose loss was measured."""
        return len({key for key, _ in self.cache})


# The inter-layer term adds calibration batches one at a time until the layers' ranking by it stops moving:
# at least MIN_BATCHES, done once two successive sizes rank alike (Spearman >= STABLE), at most the cap
# (`interlayer_batches`). On EfficientNet-Lite0 one batch ranks like noise (Spearman 0.07 against sixteen),
# and each batch costs one simulated forward per layer (docs/method.md).
MIN_BATCHES, STABLE, UNSTABLE = 2, 0.95, 0.5


def stable_terms(measure, probe: LossProbe, names: list[str], cap: int, progress: Progress
                 ) -> tuple[list[float], int, float | None]:
    """The inter-layer terms, the calibration batches they used, and the Spearman correlation between the
    rankings at the last two sizes (None with a single batch)."""
    from scipy.stats import spearmanr

    cap = probe.evaluator.calibration_batches(cap)
    previous, stability = None, None
    for batches in range(1, cap + 1):
        probe.batches = batches
        terms = measure(probe, names, lambda f, m: progress((batches - 1 + f) / cap, f"{m}, batch {batches}"))
        if previous is not None:
            stability = float(spearmanr(previous, terms).statistic)
            if batches >= MIN_BATCHES and stability >= STABLE:
                break
        previous = terms
    return terms, probe.batches, stability


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


def _unscored_layers(modules: dict[str, nn.Module], names: list[str]) -> list[LayerSensitivity]:
    return [LayerSensitivity(name=n, kind=type(weighted(modules[n])).__name__,
                             params=sum(p.numel() for p in modules[n].parameters())) for n in names]


def unscored(backend, ordering: str, why: str) -> Sensitivity:
    """The candidates in network order with no scores, when the analysis was not needed (`why`)."""
    modules = dict(backend.adapter.named_modules())
    candidates = {n: modules[backend.layer_of(n)] for n in backend.candidates}
    return _ranked(_unscored_layers(candidates, backend.candidates), list(backend.candidates),
                   {"ordering": ordering, "analysis": why}, [])


def analyse(simulation: Simulation, evaluator: Evaluator, names: list[str], options: SensitivityOptions,
            adapter: nn.Module, progress: Progress = lambda f, m: None) -> Sensitivity:
    """Score and order the candidate layers `names` (network order)."""
    layers = _unscored_layers(simulation.modules, names)
    method: dict = {"ordering": options.ordering, "loss": "fidelity to fp32" if evaluator.fidelity else
                    "cross-entropy with the labels"}
    if options.ordering == "random":
        order = list(names)
        random.Random(options.seed).shuffle(order)
        return _ranked(layers, order, method, [])

    progress(0.0, "output-Hessian traces")
    traces, how, warnings = output_traces(simulation, evaluator, names, options, adapter)
    errors = simulation.local_errors(evaluator.batches("calibration", options.hessian_batches))
    method.update(hessian=how, hessian_samples=max(t.samples for t in traces.values()))
    for layer in layers:
        outputs = errors[layer.name]
        own = simulation.layer(layer.name)
        estimate, (error, _) = traces[own], outputs[own]
        layer.hessian_trace, layer.trace_stderr, layer.output_error = estimate.mean, estimate.stderr, error
        # A tied head's term adds its embedding lookup's: the same weights err at the network's input too.
        layer.hessian_term = sum(0.5 * traces[probe].mean / elements * squared
                                 for probe, (squared, elements) in outputs.items())
    progress(0.5, "inter-layer dependencies")

    hessian_share = _normalised([layer.hessian_term for layer in layers])
    probe = LossProbe(simulation, evaluator, 1)
    if options.ordering == "hessian":
        parts = [(h, 0.0) for h in hessian_share]
    else:
        measure = conditional_terms if options.interlayer == "conditional" else pairwise_terms
        # Candidates that can all be low at once form a group (one format each): each group's dependencies are
        # measured among its own members.
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(simulation.group(name), []).append(name)
        measured, batches, stability = {}, 0, None
        for index, members in enumerate(groups.values()):
            terms, used, agreement = stable_terms(
                measure, probe, members, options.interlayer_batches,
                lambda f, m: progress(0.5 + 0.5 * (index + f) / len(groups), m))
            measured.update(zip(members, terms))
            batches = max(batches, used)
            if agreement is not None:
                stability = agreement if stability is None else min(stability, agreement)
        terms = [measured[name] for name in names]
        for layer, term in zip(layers, terms):
            layer.interlayer = term
        method.update(interlayer=options.interlayer, interlayer_weight=options.interlayer_weight,
                      interlayer_batches=batches, interlayer_stability=stability)
        if stability is not None and stability < UNSTABLE:
            warnings.append(f"the inter-layer term's ranking of the layers still changed between its last two sample "
                            f"sizes ({batches - 1} and {batches} calibration batches: Spearman {stability:.2f}), so "
                            "part of its share of the score is noise; --ordering hessian leaves it out")
        w = options.interlayer_weight
        parts = [((1 - w) * h, w * d) for h, d in zip(hessian_share, _normalised(terms))]
    method["loss_evaluations"] = probe.evaluations
    for layer, (hessian_part, interlayer_part) in zip(layers, parts):
        layer.hessian_part, layer.interlayer_part = hessian_part, interlayer_part
        layer.score = hessian_part + interlayer_part
    order = [layer.name for layer in sorted(layers, key=lambda l: l.score)]
    return _ranked(layers, order, method, warnings)


def _ranked(layers: list[LayerSensitivity], order: list[str], method: dict, warnings: list[str]) -> Sensitivity:
    rank = {name: i for i, name in enumerate(order)}
    for layer in layers:
        layer.rank = rank[layer.name]
    return Sensitivity(layers=layers, ordering=order, method=method, warnings=warnings)
