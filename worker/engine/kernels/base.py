"""What every kernel backend shares: the `Backend` interface, the simulation base class and the fake
quantizers more than one backend uses, and the bits of module plumbing (hooks, swapped weights, captured
inputs) they are built from."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..adapters import ModelAdapter
from ..plan import Plan

Inputs = tuple[torch.Tensor, ...]


# ---- fake quantization shared by several backends -------------------------------------------------

def int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 with the qparams the int8 kernels' weight observer picks."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight.detach().float())
    scale, zero_point = observer.calculate_qparams()
    out = torch.fake_quantize_per_channel_affine(weight.detach().float(), scale, zero_point.int(), 0, -128, 127)
    return out.to(weight.dtype)


def weighted(module: nn.Module) -> nn.Module:
    """The module holding the weight (a fused ConvReLU2d holds it in its first child)."""
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else module[0]


@contextlib.contextmanager
def swapped(tensors: dict[tuple[nn.Module, str], torch.Tensor]):
    """Each (module, parameter name)'s data replaced for the block."""
    saved = {(module, name): getattr(module, name).data for module, name in tensors}
    try:
        for (module, name), tensor in tensors.items():
            getattr(module, name).data = tensor
        yield
    finally:
        for (module, name), tensor in saved.items():
            getattr(module, name).data = tensor


def swapped_weights(weights: dict[nn.Module, torch.Tensor]):
    return swapped({(module, "weight"): weight for module, weight in weights.items()})


@contextlib.contextmanager
def hooks(handles: list):
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def capture_inputs(model: nn.Module, names: list[str], example: Inputs) -> dict[str, tuple]:
    """The positional inputs each named module receives on one forward pass of `model`."""
    modules = dict(model.named_modules())
    seen = {}
    with torch.inference_mode(), hooks([modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: seen.setdefault(n, args)) for n in names]):
        model(*example)
    return seen


# ---- items: a layer in one of several formats ---------------------------------------------------------

SEPARATOR = "@"  # module names never contain it


def join_item(layer: str, precision: str) -> str:
    return f"{layer}{SEPARATOR}{precision}"


def split_item(item: str) -> tuple[str, str]:
    layer, _, precision = item.rpartition(SEPARATOR)
    return layer, precision


# ---- simulations ---------------------------------------------------------------------------------

class Simulation:
    """A float model whose candidate layers can be switched to their kernels' simulated arithmetic.

    `model` runs in float unless inside `quantized(names)`; `modules` maps each candidate to its module
    in `model`, where the sensitivity analysis probes outputs.
    """

    model: nn.Module
    modules: dict[str, nn.Module]

    def layer(self, name: str) -> str:
        """The layer a candidate quantizes (a candidate is the layer itself unless it names a format too)."""
        return name

    def group(self, name: str) -> str:
        """Candidates of one group may all be low at once (one format each): the inter-layer term's unit."""
        return ""

    def quantized(self, names: Iterable[str]):
        raise NotImplementedError

    def probes(self, name: str) -> dict[str, nn.Module]:
        """The outputs a candidate changes, by name: its layer's, and any other module whose weight is the same
        tensor (a tied output head's embedding lookup). Its Hessian term is the sum of one term per output."""
        return {self.layer(name): self.modules[name]}

    def local_errors(self, batches: list[Inputs]) -> dict[str, dict[str, tuple[float, int]]]:
        """For each candidate and each of its `probes`: the squared error of that output when the candidate alone
        runs low precision with float inputs, summed over `batches`, and the number of output elements."""
        totals = {name: {probe: [0.0, 0] for probe in self.probes(name)} for name in self.modules}

        def record(name, probe):
            def hook(module, args, out):
                error = self._error(name, module, args[0], out)
                totals[name][probe][0] += float(error.double().pow(2).sum())
                totals[name][probe][1] += out.numel()
            return hook

        with torch.inference_mode(), hooks([module.register_forward_hook(record(name, probe))
                                            for name in self.modules
                                            for probe, module in self.probes(name).items()]):
            for inputs in batches:
                self.model(*inputs)
        cost.count("simulated", sum(len(inputs[0]) for inputs in batches))
        return {name: {probe: (error, count) for probe, (error, count) in probes.items()}
                for name, probes in totals.items()}

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The error in `module`'s output `out` (from input `x`) when candidate `name` runs low precision."""
        raise NotImplementedError


class LinearSimulation(Simulation):
    """Linear kernels that take and return float (dynamic int8, torchao): layers are independent, each
    quantizes its weight once and its input on every call."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear],
                 weight: Callable[[torch.Tensor], torch.Tensor],
                 activation: Callable[[torch.Tensor], torch.Tensor] | dict[str, Callable[[torch.Tensor], torch.Tensor]]):
        """`activation`: how every layer's input is quantized, or each layer's own (by name)."""
        self.model, self.modules = model, modules
        self.activations = activation if isinstance(activation, dict) else {name: activation for name in modules}
        self.low_weights = {name: weight(m.weight) for name, m in modules.items()}

    @contextlib.contextmanager
    def quantized(self, names: Iterable[str]):
        names = list(names)
        low = {self.modules[n]: self.low_weights[n] for n in names}
        pre = [self.modules[n].register_forward_pre_hook(
            lambda _m, args, quantize=self.activations[n]: (quantize(args[0]), *args[1:])) for n in names]
        with swapped_weights(low), hooks(pre):
            yield

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activations[name](x), self.low_weights[name], module.bias) - out


# ---- backends ------------------------------------------------------------------------------------

@dataclass
class Candidates:
    """What a backend factory is offered: the model, where it runs, one example batch, its quantizable
    layers (network order) and those that are not candidates whatever the backend, with why."""

    adapter: ModelAdapter
    device: str
    example: Inputs
    layers: dict[str, nn.Module]
    skipped: dict[str, str]
    runtime: str = "torch"  # where the plans run: torch, onnxruntime (onnx_runtime.py) or llama.cpp (gguf_types.py)
    formats: tuple[str, ...] = ("int8",)  # the low precisions asked for
    weight_only_activations: str = "fp32"  # the weight-only kernels' activation dtype (the worker's menu chose it)
    gguf: str | None = None  # the GGUF file the model was read from (what a llama.cpp plan is written from)
    latency: str = "decode"  # a language model's timed workload (generation.py)

    def linear(self) -> list[str]:
        return [n for n, m in self.layers.items() if isinstance(m, nn.Linear) and n not in self.skipped]

    @property
    def int8_only(self) -> bool:
        """Only the 8-bit formats every backend knows were asked for (a single-format backend's terms)."""
        return set(self.formats) <= {"int8", "fp8"}

    def usable(self) -> list[str]:
        return [n for n in self.layers if n not in self.skipped]


@dataclass
class Backend:
    """One kernel path for one model: its candidates, its float baseline, its real build, its simulation,
    and its latency profile (`profile.py`)."""

    # Asked in descending order by `choose_backend`; `create` says whether this backend takes the model.
    priority: ClassVar[int] = 0
    # The mode of onnxruntime's quantizer that makes the same kind of int8 model (export.QUANTIZATION), if any.
    onnx_quantization: ClassVar[str | None] = None
    # What a whole-model cast of `baseline` casts (`Plan.cast_of`), so the cast's plan re-applies what was timed:
    # the model as given, unless the baseline is a rewritten graph.
    cast_of: ClassVar[str] = "model"

    name: str
    note: str
    adapter: ModelAdapter
    candidates: list[str]  # layer names in network order
    baseline: nn.Module  # the float model plans are timed against, in the same execution mode
    skipped: dict[str, str] = field(default_factory=dict)  # quantizable layers that are not candidates, and why
    fallback: str | None = None  # set when this is not the path the model should have had, saying why
    # Per int8 layer, what `fit` subtracts from its bias (static int8's bias correction); empty elsewhere.
    corrections: dict[str, torch.Tensor] = field(default_factory=dict)
    formats: tuple[str, ...] = ("int8",)  # several: each candidate is an item `layer@format` (join_item)
    # Per dynamic int8 layer: its activation width, 8, or 7 where its 8-bit products saturate on this CPU (fit).
    activation_bits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, offered: Candidates) -> "Backend | None":
        raise NotImplementedError

    def fit(self, calibration: list[Inputs]) -> None:
        """What the backend learns once from the calibration batches, before any plan is built (static int8:
        its bias corrections). Nothing by default."""

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        raise NotImplementedError

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        raise NotImplementedError

    @property
    def several(self) -> bool:
        return len(self.formats) > 1

    @property
    def simulated(self) -> nn.Module:
        """The float model the simulation runs in: what the analysis's loss compares with. The baseline, except
        where plans run outside torch."""
        return self.baseline

    def layer_of(self, candidate: str) -> str:
        return split_item(candidate)[0] if self.several else candidate

    @property
    def layers(self) -> list[str]:
        """The layers the candidates quantize, in network order."""
        return list(dict.fromkeys(self.layer_of(c) for c in self.candidates))

    def assignment(self, low: Iterable[str]) -> dict[str, str]:
        """Each low layer's precision: the format's own with one format, else the item's; a layer named by
        several items takes the last."""
        if not self.several:
            return {name: self.formats[0] for name in low}
        return dict(split_item(item) for item in low)

    def effective(self, low: Iterable[str]) -> list[str]:
        """The candidates that decide the plan `low` makes (a layer named by several items: its last)."""
        if not self.several:
            return list(low)
        return [join_item(layer, precision) for layer, precision in self.assignment(low).items()]

    def precision_in(self, candidate: str, plan: Plan) -> str:
        """What `plan` does with one candidate: its low precision if the plan chose it, else the baseline's."""
        if not self.several:
            return plan.layers[candidate]
        layer, precision = split_item(candidate)
        return precision if plan.layers[layer] == precision else plan.baseline_precision

    def all_low(self) -> Plan:
        return Plan(layers=self.assignment(self.candidates), backend=self.name)

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5):
        """What each candidate saves on the real kernels: a `LatencyProfile` (profile.py)."""
        raise NotImplementedError
