"""Kernel backends: how a `Plan` becomes a model on real low-precision kernels, and a simulation of
exactly that arithmetic for the sensitivity analysis (which tries hundreds of layer subsets, too many to
build real models for).

| backend        | where           | real kernels                          | simulated as                                  |
|----------------|-----------------|---------------------------------------|-----------------------------------------------|
| dynamic-int8   | CPU, Linear     | `quantize_dynamic` on x86 (fbgemm)    | per-channel symmetric int8 weights; inputs     |
|                |                 |                                       | quantized per call to 7 bits (reduce_range)   |
| fx-static-int8 | CPU, conv nets  | FX graph mode static int8 on oneDNN   | the same FX graph, observers calibrated once  |
|                |                 |                                       | and replaced by switchable fake-quant nodes   |
| torchao-*      | CUDA, Linear    | torchao `quantize_` (int8 or fp8)     | per-token int8 / per-tensor fp8 inputs,       |
|                |                 |                                       | per-channel int8 / per-tensor fp8 weights     |

Every reported metric and latency comes from `Backend.build`; only the sensitivity analysis uses
`Backend.simulation`. On the FX path an element-wise op (add, activation, pooling) runs in int8 only
where all its inputs are int8, so a plan with a few int8 layers is truly partial.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ModelAdapter, quantizable_layers
from .latency import Paired, paired
from .plan import Plan

FX_STATIC = "fx-static-int8"
DYNAMIC = "dynamic-int8"
TORCHAO_INT8 = "torchao-int8"
TORCHAO_FP8 = "torchao-fp8"
ENGINES = {FX_STATIC: "onednn", DYNAMIC: "x86"}
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Inputs = tuple[torch.Tensor, ...]


# ---- fake quantization: the kernels' arithmetic in float -------------------------------------------

def int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 with the qparams the int8 kernels' weight observer picks."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight.detach().float())
    scale, zero_point = observer.calculate_qparams()
    out = torch.fake_quantize_per_channel_affine(weight.detach().float(), scale, zero_point.int(), 0, -128, 127)
    return out.to(weight.dtype)


def dynamic_7bit(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine over [min(x, 0), max(x, 0)] with 128 levels, as fbgemm's dynamic Linear does
    (reduce_range=True): computed per call, like the kernel."""
    scale, zero_point = torch._choose_qparams_per_tensor(x.detach(), True)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 127)


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (token), as torchao's dynamic int8 activations."""
    scale = x.detach().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def fp8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale per tensor, as torchao's default fp8 configuration."""
    scale = x.detach().abs().amax().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


QParams = tuple[float, int, int, int]  # scale, zero point, quant_min, quant_max


def qparams_of(observer) -> QParams:
    scale, zero_point = observer.calculate_qparams()
    return float(scale), int(zero_point), observer.quant_min, observer.quant_max


class FakeQuant(nn.Module):
    """Quantize-dequantize on one graph edge, with calibrated qparams: the producer's output observer's
    when the producer runs int8, the consumer's input observer's when only the consumer does (they
    differ where an observer is shared, e.g. by a conv and the ReLU after it). Off while `side` is None."""

    def __init__(self, producer: QParams, consumer: QParams | None):
        super().__init__()
        self.qparams = {"producer": producer, "consumer": consumer}
        self.side: str | None = None

    def quantize(self, x: torch.Tensor, side: str) -> torch.Tensor:
        scale, zero_point, quant_min, quant_max = self.qparams[side]
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.side is None else self.quantize(x, self.side)


def weighted(module: nn.Module) -> nn.Module:
    """The module holding the weight (a fused ConvReLU2d holds it in its first child)."""
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else module[0]


@contextlib.contextmanager
def swapped_weights(weights: dict[nn.Module, torch.Tensor]):
    saved = {module: module.weight.data for module in weights}
    try:
        for module, weight in weights.items():
            module.weight.data = weight
        yield
    finally:
        for module, weight in saved.items():
            module.weight.data = weight


@contextlib.contextmanager
def hooks(handles: list):
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


# ---- simulations ---------------------------------------------------------------------------------

class Simulation:
    """A float model whose candidate layers can be switched to their kernels' simulated arithmetic.

    `model` runs in float unless inside `quantized(names)`; `modules` maps each candidate to its module
    in `model`, where the sensitivity analysis probes outputs.
    """

    model: nn.Module
    modules: dict[str, nn.Module]

    def quantized(self, names: Iterable[str]):
        raise NotImplementedError

    def local_errors(self, batches: list[Inputs]) -> dict[str, tuple[float, int]]:
        """For each candidate: the squared error of its output when it alone runs low precision with
        float inputs, summed over `batches`, and the number of output elements."""
        totals = {name: [0.0, 0] for name in self.modules}

        def record(name):
            def hook(module, args, out):
                error = self._error(name, module, args[0], out)
                totals[name][0] += float(error.double().pow(2).sum())
                totals[name][1] += out.numel()
            return hook

        with torch.inference_mode(), hooks([m.register_forward_hook(record(n)) for n, m in self.modules.items()]):
            for inputs in batches:
                self.model(*inputs)
        return {name: (error, count) for name, (error, count) in totals.items()}

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The error in `module`'s output `out` (from input `x`) when it runs low precision."""
        raise NotImplementedError


class LinearSimulation(Simulation):
    """Linear kernels that take and return float (dynamic int8, torchao): layers are independent, each
    quantizes its weight once and its input on every call."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear],
                 weight: Callable[[torch.Tensor], torch.Tensor], activation: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self.modules, self.activation = model, modules, activation
        self.low_weights = {name: weight(m.weight) for name, m in modules.items()}

    @contextlib.contextmanager
    def quantized(self, names: Iterable[str]):
        names = list(names)
        low = {self.modules[n]: self.low_weights[n] for n in names}
        pre = [self.modules[n].register_forward_pre_hook(lambda _m, args: (self.activation(args[0]), *args[1:]))
               for n in names]
        with swapped_weights(low), hooks(pre):
            yield

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activation(x), self.low_weights[name], module.bias) - out


class FxStaticSimulation(Simulation):
    """The FX-prepared graph of the all-int8 plan, calibrated once, each observer replaced by one
    fake-quant node per consumer edge. Calibration sees float activations whatever the plan, so these
    are the qparams every plan's real model gets; where the producer of an edge runs float, the qparams
    come from a second calibration with only the candidate layers int8 (their own input observers).
    For a subset, an edge is quantized where its producer or its consumer runs int8, as in the real model."""

    def __init__(self, backend: "FxStaticInt8", calibration: list[Inputs]):
        self.backend = backend
        candidates = set(backend.candidates)
        inputs = {}  # (producer, candidate consumer) -> the candidate's own input qparams
        for edge in self._observed_edges(backend.calibrated(candidates, elementwise=False, data=calibration)):
            if edge[2].op == "call_module" and edge[2].target in candidates:
                inputs[edge[1].name, edge[2].name] = edge[3]
        prepared = backend.calibrated(candidates, elementwise=True, data=calibration)
        self.edges: list[tuple[FakeQuant, torch.fx.Node, torch.fx.Node]] = []  # (fake-quant, producer, consumer)
        graph = prepared.graph
        for observer_node, producer, consumer, qparams in self._observed_edges(prepared):
            fake = FakeQuant(qparams, inputs.get((producer.name, consumer.name)))
            target = f"mixq_fake_quant_{len(self.edges)}"
            prepared.add_submodule(target, fake)
            with graph.inserting_after(observer_node):
                edge = graph.call_module(target, (producer,))
            consumer.replace_input_with(observer_node, edge)
            self.edges.append((fake, producer, consumer))
        self._pass_qparams_through(prepared)
        for node in list(graph.nodes):
            if node.op == "call_module" and not node.users and node.target.startswith("activation_post_process"):
                graph.erase_node(node)
        graph.lint()
        prepared.recompile()
        self.model = prepared
        modules = dict(prepared.named_modules())
        self.modules = {name: modules[name] for name in backend.candidates}
        self.low_weights = {name: int8_per_channel(weighted(m).weight) for name, m in self.modules.items()}
        self.clamped = {name for name in backend.candidates if backend.feeds_only_relu6(name)}
        self.into = {consumer.target: fake for fake, _, consumer in self.edges if consumer.target in candidates}
        self.out_of = {producer.target: fake for fake, producer, _ in self.edges if producer.target in candidates}

    def _pass_qparams_through(self, prepared: torch.fx.GraphModule) -> None:
        """An int8 pass-through op (ReLU, pooling, flatten, dropout) hands on its input's quantized tensor,
        scale and all, whatever observer FX placed after it: its out-edges take its in-edge's qparams."""
        fakes = {edge: prepared.get_submodule(edge.target) for edge in prepared.graph.nodes if self._is_edge(edge)}
        modules = dict(prepared.named_modules())
        for edge, fake in fakes.items():  # graph order: upstream edges are settled first
            producer = edge.args[0]
            upstream = producer.args[0] if producer.op in ("call_module", "call_function") and producer.args else None
            if upstream in fakes and self.backend.op_key(producer, modules) in self.backend.passthrough:
                fake.qparams["producer"] = fakes[upstream].qparams["producer"]

    @staticmethod
    def _observed_edges(prepared: torch.fx.GraphModule):
        """(observer node, producer, consumer, qparams) for every consumer of every observer."""
        from torch.ao.quantization.observer import ObserverBase

        for node in list(prepared.graph.nodes):
            # get_submodule, not named_modules(): a shared observer is one module under several names
            observer = prepared.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(observer, ObserverBase):
                for consumer in list(node.users):
                    yield node, node.args[0], consumer, qparams_of(observer)

    @contextlib.contextmanager
    def quantized(self, names: Iterable[str]):
        names = set(names)
        int8 = {node.name for node in self.backend.int8_nodes(self.model.graph, names, skip=self._is_edge)}
        for fake, producer, consumer in self.edges:
            fake.side = "producer" if producer.name in int8 else "consumer" if consumer.name in int8 else None
        try:
            with swapped_weights({weighted(self.modules[n]): self.low_weights[n] for n in names}):
                yield
        finally:
            for fake, _, _ in self.edges:
                fake.side = None

    @staticmethod
    def _is_edge(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and node.target.startswith("mixq_fake_quant_")

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        into, out_edge = self.into.get(name), self.out_of.get(name)
        with swapped_weights({weighted(module): self.low_weights[name]}):
            low = module.forward(into.quantize(x, "consumer") if into else x)  # forward(): no hooks, no recursion
        if out_edge:
            low = out_edge.quantize(low, "producer")
        if name in self.clamped:  # the ReLU6 after it drops what the clamped observer clips: compare after it
            return low.clamp(0, 6) - out.clamp(0, 6)
        return low - out


# ---- latency profiles ----------------------------------------------------------------------------

@dataclass
class LatencyProfile:
    """What each candidate saves on the real kernels, and a linear prediction of any plan's latency:
    `intercept_ms - slope * sum of the plan's savings`, exact at the plans it was fitted on. Every plan the
    search times checks it again."""

    method: str
    savings: dict[str, Paired]  # per candidate: its saving (difference_ms) and how noisy that figure is
    baseline_ms: float
    all_low_ms: float
    intercept_ms: float
    slope: float

    def saving(self, name: str) -> float:
        return self.savings[name].difference_ms

    def measurable(self, name: str) -> bool:
        """A saving counts only if it stands clear of its own timing noise."""
        timing = self.savings[name]
        return timing.difference_ms > timing.noise_ms

    def predict_ms(self, low: Iterable[str]) -> float:
        return self.intercept_ms - self.slope * sum(self.saving(n) for n in low)

    def to_dict(self) -> dict:
        return {"method": self.method, "baseline_ms": self.baseline_ms, "all_low_ms": self.all_low_ms,
                "intercept_ms": self.intercept_ms, "slope": self.slope}


def capture_inputs(model: nn.Module, names: list[str], example: Inputs) -> dict[str, tuple]:
    """The positional inputs each named module receives on one forward pass of `model`."""
    modules = dict(model.named_modules())
    seen = {}
    with torch.inference_mode(), hooks([modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: seen.setdefault(n, args)) for n in names]):
        model(*example)
    return seen


# ---- backends ------------------------------------------------------------------------------------

@dataclass
class Backend:
    """One kernel path for one model: its candidates, its float baseline, its real build, its simulation."""

    name: str
    note: str
    adapter: ModelAdapter
    candidates: list[str]  # layer names in network order
    baseline: nn.Module  # the float model plans are timed against, in the same execution mode
    skipped: dict[str, str] = field(default_factory=dict)  # quantizable layers that are not candidates, and why
    fallback: str | None = None  # set when this is not the path the model should have had, saying why

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        raise NotImplementedError

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        raise NotImplementedError

    def all_low(self) -> Plan:
        return Plan(layers={n: "int8" for n in self.candidates}, backend=self.name)

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5) -> LatencyProfile:
        """Layers whose kernels take and return float (dynamic int8, torchao) save independently of each
        other: each is timed alone, fp32 module against int8 module on the inputs it receives, and the sum
        is scaled to one whole-model timing of the all-low plan against the baseline."""
        example = calibration[0]
        cuda = example[0].is_cuda
        low_model = self.build(self.all_low(), calibration)
        float_inputs = capture_inputs(self.adapter, self.candidates, example)
        low_inputs = capture_inputs(low_model, self.candidates, example)
        float_modules, low_modules = dict(self.adapter.named_modules()), dict(low_model.named_modules())
        savings = {n: paired(lambda n=n: float_modules[n](*float_inputs[n]),
                             lambda n=n: low_modules[n](*low_inputs[n]), cuda=cuda,
                             rounds=_rounds(lambda n=n: float_modules[n](*float_inputs[n]), seconds_per_layer))
                   for n in self.candidates}
        whole = paired(lambda: self.baseline(*example), lambda: low_model(*example), rounds=7, inner=1, cuda=cuda)
        total = sum(timing.difference_ms for timing in savings.values())
        return LatencyProfile(
            "each layer's fp32 and int8 modules timed alone on its captured inputs, interleaved; their sum "
            "scaled to one whole-model timing of the all-low plan", savings, whole.first_ms, whole.second_ms,
            intercept_ms=whole.first_ms, slope=whole.difference_ms / total if total > 0 else 1.0)


class DynamicInt8(Backend):
    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        low = plan.low_precision_layers
        if not low:
            return self.adapter
        torch.backends.quantized.engine = ENGINES[DYNAMIC]
        return quantize_dynamic(copy.deepcopy(self.adapter).eval(), {n: per_channel_dynamic_qconfig for n in low},
                                dtype=torch.qint8)

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        layers = quantizable_layers(self.adapter)
        return LinearSimulation(self.adapter, {n: layers[n] for n in self.candidates}, int8_per_channel, dynamic_7bit)


class TorchaoLinear(Backend):
    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, quantize_)

        wanted = set(plan.low_precision_layers)
        if not wanted:
            return self.adapter
        config = Float8DynamicActivationFloat8WeightConfig() if self.name == TORCHAO_FP8 else \
            Int8DynamicActivationInt8WeightConfig()
        model = copy.deepcopy(self.adapter).eval()
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted and isinstance(module, nn.Linear))
        return model

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        layers = quantizable_layers(self.adapter)
        if self.name == TORCHAO_FP8:
            return LinearSimulation(self.adapter, {n: layers[n] for n in self.candidates}, fp8_per_tensor,
                                    fp8_per_tensor)
        return LinearSimulation(self.adapter, {n: layers[n] for n in self.candidates}, int8_per_channel,
                                int8_per_token)


class FxStaticInt8(Backend):
    """FX graph mode static int8. `graph` is the traced adapter with BatchNorm folded: the baseline."""

    def __init__(self, adapter: ModelAdapter, candidates: list[str], graph: torch.fx.GraphModule, example: Inputs,
                 skipped: dict[str, str] | None = None):
        super().__init__(FX_STATIC, "FX static int8 (oneDNN) for Conv2d and Linear; element-wise ops int8 only "
                         "where their inputs are; baseline: the same graph in fp32, BatchNorm folded",
                         adapter, candidates, graph, skipped or {})
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.fx.passes.shape_prop import ShapeProp

        self.graph = graph
        self.defaults = get_default_qconfig_mapping(ENGINES[FX_STATIC])
        with torch.inference_mode():
            ShapeProp(graph).propagate(*example)  # records which nodes produce tensors
        self.tensor_nodes = {n.name for n in graph.graph.nodes
                             if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)}
        self.supported, self.passthrough = _fx_supported_ops()
        # A module called more than once becomes one quantized module for all its calls: only a pass-through
        # op (which works on either kind of tensor) may then run int8 in some calls and float in others.
        calls = [n.target for n in graph.graph.nodes if n.op == "call_module"]
        self.shared_modules = {target for target in calls if calls.count(target) > 1}

    def op_key(self, node: torch.fx.Node, modules: dict[str, nn.Module]):
        return type(modules[node.target]) if node.op == "call_module" else node.target

    def int8_nodes(self, graph: torch.fx.Graph, low: set[str], skip: Callable[[torch.fx.Node], bool] = lambda n: False
                   ) -> set[torch.fx.Node]:
        """The nodes that run int8 under a plan: its low-precision layers, and every supported element-wise
        op all of whose tensor inputs run int8. `skip` marks pass-through nodes (simulation edges)."""
        modules = dict(graph.owning_module.named_modules())
        candidates = set(self.candidates)
        int8: set[torch.fx.Node] = set()

        def source(node):
            while skip(node):
                node = node.args[0]
            return node

        for node in graph.nodes:
            if node.op not in ("call_module", "call_function") or skip(node):
                continue
            if node.op == "call_module" and node.target in candidates:
                if node.target in low:
                    int8.add(node)
                continue
            inputs = [source(i) for i in node.all_input_nodes]
            key = self.op_key(node, modules)
            if (node.name in self.tensor_nodes and key in self.supported and inputs and all(i in int8 for i in inputs)
                    and (key in self.passthrough or node.target not in self.shared_modules)):
                int8.add(node)
        return int8

    def _qconfig(self, node: torch.fx.Node, modules: dict[str, nn.Module]):
        return self.defaults.object_type_qconfigs.get(self.op_key(node, modules), self.defaults.global_qconfig)

    @staticmethod
    def _clamp_observed(observer: nn.Module, low: float, high: float) -> None:
        observer.register_forward_pre_hook(lambda _module, args: (args[0].clamp(low, high), *args[1:]))

    def _clamp_relu6_outputs(self, prepared: torch.fx.GraphModule, low: set[str]) -> None:
        """A layer whose output only feeds ReLU6 gets its output observer fed the clamped values, so the
        int8 layer clamps in its own requantization (as a fused conv-ReLU6 would) instead of spending its
        256 levels on values ReLU6 discards; its input observer is left alone."""
        from torch.ao.quantization.observer import ObserverBase

        for node in prepared.graph.nodes:
            producer = node.args[0] if node.op == "call_module" and node.args else None
            if (isinstance(producer, torch.fx.Node) and producer.op == "call_module" and producer.target in low
                    and self.feeds_only_relu6(producer.target)
                    and isinstance(prepared.get_submodule(node.target), ObserverBase)):
                self._clamp_observed(prepared.get_submodule(node.target), 0.0, 6.0)

    def feeds_only_relu6(self, layer: str) -> bool:
        modules = dict(self.graph.named_modules())
        node = next((n for n in self.graph.graph.nodes if n.op == "call_module" and n.target == layer), None)
        return (layer in self.candidates and node is not None and bool(node.users)
                and all(_is_relu6(user, modules) for user in node.users))

    def mapping(self, low: set[str], elementwise: bool = True):
        """The QConfigMapping that quantizes exactly the plan's int8 nodes (everything else float);
        `elementwise=False` leaves every element-wise op float (for calibrating layer inputs alone)."""
        from torch.ao.quantization import QConfigMapping

        mapping = QConfigMapping()  # global None: float unless named below
        modules = dict(self.graph.named_modules())
        int8 = self.int8_nodes(self.graph.graph, low)
        if not elementwise:
            int8 = {n for n in int8 if n.op == "call_module" and n.target in low}
        for node, (scope, op, index) in self._call_order().items():
            if node in int8:  # addressed per call: a module can be called twice, once int8 and once not
                mapping.set_module_name_object_type_order(scope, op, index, self._qconfig(node, modules))
        return mapping

    def _call_order(self) -> dict[torch.fx.Node, tuple[str, object, int]]:
        """Each op node's (scope, op, index) as FX's QConfigMapping counts them: functional ops by their
        order at the root of this flat graph, module calls by their order among same-type calls in the
        module's parent."""
        modules = dict(self.graph.named_modules())
        counts: dict = {}
        order = {}
        for node in self.graph.graph.nodes:
            if node.op == "call_function":
                scope, op = "", node.target
            elif node.op == "call_module":
                scope, op = node.target.rpartition(".")[0], type(modules[node.target])
            else:
                continue
            order[node] = (scope, op, counts.get((scope, op), 0))
            counts[scope, op] = order[node][2] + 1
        return order

    def calibrated(self, low: set[str], data: list[Inputs], elementwise: bool = True) -> torch.fx.GraphModule:
        """The graph prepared for a plan, its observers having seen the calibration batches."""
        from torch.ao.quantization.quantize_fx import prepare_fx

        prepared = prepare_fx(copy.deepcopy(self.graph), self.mapping(low, elementwise), data[0])
        self._clamp_relu6_outputs(prepared, low)
        with torch.inference_mode():
            for inputs in data:
                prepared(*inputs)
        return prepared

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        low = set(plan.low_precision_layers)
        if not low:  # a float plan is the original model
            return self.adapter
        torch.backends.quantized.engine = ENGINES[FX_STATIC]
        return convert_fx(self.calibrated(low, calibration))

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        return FxStaticSimulation(self, calibration)

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5) -> LatencyProfile:
        """A static int8 layer's cost depends on its neighbours (a float neighbour means a quantize or a
        dequantize, and oneDNN's layouts change between them), so each layer is timed in context: the
        all-low model against itself with that one layer swapped for its fp32 version between a dequantize
        and a quantize, interleaved in rounds (no rebuild: the swap is in place)."""
        example = calibration[0]
        all_low = self.build(self.all_low(), calibration[:1])  # timing does not depend on activation ranges
        whole = paired(lambda: self.baseline(*example), lambda: all_low(*example), rounds=7, inner=1)
        rounds = min(30, max(5, int(seconds_per_layer * 500 / max(whole.second_ms, 1e-3))))
        low_modules, float_modules = dict(all_low.named_modules()), dict(self.graph.named_modules())
        savings = {}
        for name in self.candidates:
            int8, fp32 = low_modules[name], FloatIsland(float_modules[name], low_modules[name])

            def run_with(module, name=name):
                all_low.set_submodule(name, module)
                return all_low(*example)

            savings[name] = paired(lambda: run_with(fp32), lambda: run_with(int8), rounds=rounds, inner=1)
            all_low.set_submodule(name, int8)
        total = sum(timing.difference_ms for timing in savings.values())
        return LatencyProfile(
            "leave-one-out on the real kernels: the all-low model against itself with the layer in fp32 "
            "between a dequantize and a quantize, interleaved", savings, whole.first_ms, whole.second_ms,
            intercept_ms=whole.second_ms + total, slope=1.0)


def _rounds(call, seconds: float) -> int:
    """Timing rounds (of 3 calls each of two functions) that fit in about `seconds`, 5 to 30."""
    started = time.perf_counter()
    with torch.inference_mode():
        call()
    took = max(time.perf_counter() - started, 1e-6)
    return min(30, max(5, int(seconds / (6 * took))))


class FloatIsland(nn.Module):
    """An int8 graph's layer run in fp32 instead, behind a dequantize and re-quantized to the int8
    layer's output scale: what keeping that one layer float costs, for timing."""

    def __init__(self, module: nn.Module, quantized: nn.Module):
        super().__init__()
        self.module = module
        self.scale, self.zero_point = float(quantized.scale), int(quantized.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(self.module(x.dequantize()), self.scale, self.zero_point, torch.quint8)


def _is_relu6(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val)
                                                == (0.0, 6.0))
    return node.op == "call_function" and node.target is F.relu6


def _fx_supported_ops() -> tuple[set, set]:
    """Module types and functions the oneDNN backend config runs in int8, and those among them that hand
    on their input's quantized tensor (output qparams = input qparams)."""
    import torch.ao.quantization.backend_config.utils  # noqa: F401  (the config builder needs it loaded)
    from torch.ao.quantization.backend_config import ObservationType, get_onednn_backend_config

    configs = [c for c in get_onednn_backend_config().configs if c.pattern is not None
               and not isinstance(c.pattern, tuple)]
    supported = {c.pattern for c in configs} | {operator.add, operator.mul}
    shared = {c.pattern for c in configs if c.observation_type == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT}
    return supported, shared | {nn.Dropout, F.dropout}  # dropout is the identity in eval


def unused_layers(adapter: nn.Module, names: list[str], example: Inputs) -> list[str]:
    """Layers whose weights do not reach the output (e.g. a pooler the task ignores)."""
    layers = quantizable_layers(adapter)
    weights = [layers[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(adapter(*example).float().sum(), weights, allow_unused=True)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return [n for n, g in zip(names, grads) if g is None]


UNUSED = "its output does not reach the model's output for this task, so quantizing it cannot change anything"


def choose_backend(adapter: ModelAdapter, device: str, example: Inputs) -> Backend:
    layers = quantizable_layers(adapter)
    unused = set(unused_layers(adapter, list(layers), example))
    skipped = {n: UNUSED for n in layers if n in unused}
    linear = [n for n, m in layers.items() if isinstance(m, nn.Linear) and n not in unused]
    if device.startswith("cuda"):
        fp8 = torch.cuda.get_device_capability() >= (8, 9)
        convs = {n: "torchao quantizes Linear layers only" for n, m in layers.items() if not isinstance(m, nn.Linear)}
        return TorchaoLinear(TORCHAO_FP8 if fp8 else TORCHAO_INT8, "torchao per-module quantization of Linear layers",
                             adapter, linear, adapter, {**skipped, **convs})
    if not any(isinstance(m, nn.Conv2d) for m in layers.values()):
        return DynamicInt8(DYNAMIC, "dynamic int8 Linear kernels (per-channel weights, 7-bit activations)",
                           adapter, linear, adapter, skipped)
    from torch.ao.quantization.quantize_fx import fuse_fx

    try:
        graph = fuse_fx(copy.deepcopy(adapter).eval())
    except Exception as exc:  # FX cannot trace every architecture; Linear layers still quantize dynamically
        why = f"the model is not FX-traceable ({type(exc).__name__}: {str(exc)[:160]}), so convolutions stay fp32"
        convs = {n: why for n, m in layers.items() if not isinstance(m, nn.Linear)}
        return DynamicInt8(DYNAMIC, "dynamic int8 Linear kernels only", adapter, linear, adapter,
                           {**skipped, **convs}, fallback=f"static int8 was not possible: {why}")
    candidates = [n for n in layers if n not in unused]
    return FxStaticInt8(adapter, candidates, graph, example, skipped)


def backend_for(adapter: ModelAdapter, plan: Plan, example: Inputs) -> Backend:
    """The backend a plan was made for, rebuilt on `adapter` (for re-applying a stored plan)."""
    backend = choose_backend(adapter, plan.device, example)
    if backend.name != plan.backend:
        raise ValueError(f"the plan needs the {plan.backend} backend, but this model and device give {backend.name}")
    return backend


def float_model(adapter: nn.Module, precision: str, device: str) -> nn.Module:
    """The model in the baseline precision plans are compared against: fp32 on CPU, 16-bit on GPU."""
    return adapter.to(device=device, dtype=FLOAT_DTYPES[precision]).eval()


def apply_plan(adapter: ModelAdapter, plan: Plan, calibration: list[Inputs]) -> nn.Module:
    """A new model with the plan's low-precision layers on real kernels; `adapter` is left untouched."""
    return backend_for(adapter, plan, calibration[0]).build(plan, calibration)
