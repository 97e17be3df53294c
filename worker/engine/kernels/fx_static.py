"""`fx-static-int8`: CPU conv nets through FX graph mode static int8 on the oneDNN engine, and a simulation of
that graph. A plan's int8 layers get int8 qconfigs by name; an element-wise op (add, activation, pooling)
runs in int8 only where all its inputs are int8, so a plan with a few int8 layers is truly partial. The
baseline is the same FX graph in fp32 with BatchNorm folded."""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..adapters import ModelAdapter
from ..latency import paired
from ..plan import FOLDED_GRAPH, Plan
from .base import Backend, Candidates, Inputs, Simulation, hooks, int8_per_channel, swapped, weighted
from .dynamic import DynamicInt8
from .profile import LatencyProfile, leave_one_out
from .registry import register

FX_STATIC = "fx-static-int8"


def engine() -> str:
    """oneDNN where the CPU has int8 dot products (VNNI, AMX); fbgemm's x86 engine, with its 7-bit activations,
    elsewhere. Measured on an AVX2-only AMD EPYC (2026-12-05): a static int8 ResNet on oneDNN with 2 threads
    gave outputs that differed by up to 0.09 between calls of the same model in about one process in three
    (never with 1 thread, never on the x86 engine), and 8-bit products saturate without VNNI."""
    from ..hardware import detect

    return "onednn" if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(detect().flags) else "x86"

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
        self.low_biases = {name: backend.corrected_bias(name, weighted(m).bias) for name, m in self.modules.items()}
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
            with swapped(self._low_parameters(names)):
                yield
        finally:
            for fake, _, _ in self.edges:
                fake.side = None

    @staticmethod
    def _is_edge(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and node.target.startswith("mixq_fake_quant_")

    def _low_parameters(self, names: Iterable[str]) -> dict:
        """Each named layer's int8 weight and, where it has a bias, its corrected bias."""
        low = {}
        for name in names:
            layer = weighted(self.modules[name])
            low[layer, "weight"] = self.low_weights[name]
            if self.low_biases[name] is not None:
                low[layer, "bias"] = self.low_biases[name]
        return low

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        into, out_edge = self.into.get(name), self.out_of.get(name)
        with swapped(self._low_parameters([name])):
            low = module.forward(into.quantize(x, "consumer") if into else x)  # forward(): no hooks, no recursion
        if out_edge:
            low = out_edge.quantize(low, "producer")
        if name in self.clamped:  # the ReLU6 after it drops what the clamped observer clips: compare after it
            return low.clamp(0, 6) - out.clamp(0, 6)
        return low - out


def folded_graph(adapter: nn.Module) -> torch.fx.GraphModule:
    """The model as conv nets' plans run it: traced, BatchNorm folded into its convolutions, channels-last (the
    fast layout for oneDNN on CPU: fp32 EfficientNet-Lite0 25% faster). The baseline, every int8 plan and a
    whole cast of a conv net are this graph, as a deployment would run them; `adapter` is left untouched."""
    from torch.ao.quantization.quantize_fx import fuse_fx

    return fuse_fx(copy.deepcopy(adapter).eval()).to(memory_format=torch.channels_last)


@register
class FxStaticInt8(Backend):
    """FX graph mode static int8. `graph` is the traced adapter with BatchNorm folded: the baseline."""

    priority = 20  # CPU models with convolutions
    cast_of = FOLDED_GRAPH
    onnx_quantization = "static"

    @classmethod
    def create(cls, offered: Candidates) -> "Backend | None":
        if offered.device.startswith("cuda") or not offered.int8_only or not any(isinstance(m, nn.Conv2d) for m in offered.layers.values()):
            return None
        try:
            graph = folded_graph(offered.adapter)
        except Exception as exc:  # FX cannot trace every architecture; Linear layers still quantize dynamically
            why = (f"the model is not FX-traceable ({type(exc).__name__}: {str(exc)[:160]}), so convolutions stay "
                   "fp32")
            return DynamicInt8.linear_only(offered, skipped_convs=why, fallback=f"static int8 was not possible: {why}")
        return cls(offered.adapter, offered.usable(), graph, offered.example, offered.skipped)

    def __init__(self, adapter: ModelAdapter, candidates: list[str], graph: torch.fx.GraphModule, example: Inputs,
                 skipped: dict[str, str] | None = None):
        self.engine = engine()
        super().__init__(FX_STATIC, f"FX static int8 ({self.engine}) for Conv2d and Linear, per-tensor min/max "
                         "activation ranges; element-wise ops int8 only where their inputs are; baseline: the same "
                         "graph in fp32, BatchNorm folded; channels-last weights throughout",
                         adapter, candidates, graph, skipped or {})
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.fx.passes.shape_prop import ShapeProp

        self.graph = graph
        self.defaults = _minmax_activations(get_default_qconfig_mapping(self.engine))
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

    def fit(self, calibration: list[Inputs]) -> None:
        """Bias correction, from the weights alone: per int8 layer and output channel, the mean shift its int8
        weights make in its output, E[(W_q - W) x] over the calibration batches, to be subtracted from its bias.
        Activation ranges are calibrated on the uncorrected float graph whatever the plan, so the qparams stay
        plan-independent and the simulation exact. All-int8 EfficientNet-Lite0 and -Lite2: KL to fp32 halved
        (docs/method.md)."""
        modules = dict(self.graph.named_modules())
        sums: dict[str, torch.Tensor] = {}
        counts = dict.fromkeys(self.candidates, 0)
        errors = {name: int8_per_channel(weighted(modules[name]).weight) - weighted(modules[name]).weight
                  for name in self.candidates}

        def accumulate(name):
            def hook(module, args, _out):
                layer, x = weighted(module), args[0]
                if isinstance(layer, nn.Conv2d):
                    shift = layer._conv_forward(x, errors[name], None).transpose(0, 1).flatten(1)
                else:
                    shift = F.linear(x, errors[name]).flatten(0, -2).T
                sums[name] = sums.get(name, 0) + shift.sum(1)
                counts[name] += shift.shape[1]
            return hook

        with torch.inference_mode(), hooks([modules[n].register_forward_hook(accumulate(n)) for n in self.candidates]):
            for inputs in calibration:
                self.graph(*inputs)
        cost.count("forward", 2 * sum(len(inputs[0]) for inputs in calibration))  # the graph, then the weight error
        self.corrections = {name: sums[name] / counts[name] for name in sums}

    def corrected_bias(self, name: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        """A layer's bias in int8, or None where it has none (nothing to correct)."""
        return None if bias is None else bias.detach() - self.corrections.get(name, 0)

    def calibrated(self, low: set[str], data: list[Inputs], elementwise: bool = True) -> torch.fx.GraphModule:
        """The graph prepared for a plan, its observers having seen the calibration batches."""
        from torch.ao.quantization.quantize_fx import prepare_fx

        prepared = prepare_fx(copy.deepcopy(self.graph), self.mapping(low, elementwise), data[0])
        self._clamp_relu6_outputs(prepared, low)
        with torch.inference_mode():
            for inputs in data:
                prepared(*inputs)
        cost.count("forward", sum(len(inputs[0]) for inputs in data))
        return prepared

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        low = set(plan.low_precision_layers)
        if not low:  # a float plan is the original model
            return self.adapter
        torch.backends.quantized.engine = self.engine
        prepared = self.calibrated(low, calibration)
        for name in low:  # corrected after calibration: the activation ranges are the plan-independent ones
            layer = weighted(prepared.get_submodule(name))
            if layer.bias is not None:
                layer.bias.data = self.corrected_bias(name, layer.bias)
        return convert_fx(prepared)

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        return FxStaticSimulation(self, calibration)

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5, workload=None) -> LatencyProfile:
        """A static int8 layer's cost depends on its neighbours (a float neighbour means a quantize or a
        dequantize, and oneDNN's layouts change between them), so each layer is timed in context: the
        all-low model against itself with that one layer swapped for its fp32 version between a dequantize
        and a quantize, interleaved in rounds (no rebuild: the swap is in place). `workload` is
        ignored: these backends serve no generation model, so it is always the example batch."""
        example = calibration[0]
        all_low = self.build(self.all_low(), calibration[:1])  # timing does not depend on activation ranges
        low_modules, float_modules = dict(all_low.named_modules()), dict(self.graph.named_modules())

        def pair(name: str, rounds: int):
            int8, fp32 = low_modules[name], FloatIsland(float_modules[name], low_modules[name])

            def run_with(module):
                all_low.set_submodule(name, module)
                return all_low(*example)

            try:
                return paired(lambda: run_with(fp32), lambda: run_with(int8), rounds=rounds, inner=1,
                              samples=len(example[0]))
            finally:
                all_low.set_submodule(name, int8)

        return leave_one_out(self.baseline, all_low, example, self.candidates, seconds_per_layer,
                             "leave-one-out on the real kernels: the all-low model against itself with the layer in "
                             "fp32 between a dequantize and a quantize, interleaved", pair)


class FloatIsland(nn.Module):
    """An int8 graph's layer run in fp32 instead, behind a dequantize and re-quantized to the int8
    layer's output scale: what keeping that one layer float costs, for timing."""

    def __init__(self, module: nn.Module, quantized: nn.Module):
        super().__init__()
        self.module = module
        self.scale, self.zero_point = float(quantized.scale), int(quantized.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(self.module(x.dequantize()), self.scale, self.zero_point, torch.quint8)


def _minmax_activations(mapping):
    """The engine's default qconfigs with per-tensor min/max activation ranges instead of its histogram
    observer: on EfficientNet-Lite0 and -Lite2 the all-int8 model's KL to fp32 and top-1 are the same within
    their noise, and calibration takes a quarter of the time (docs/method.md). Fixed-qparams ops (sigmoid,
    tanh) keep their own observers."""
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    def swapped(qconfig):
        if qconfig is None:
            return None
        activation = qconfig.activation()
        if not isinstance(activation, HistogramObserver):
            return qconfig
        return QConfig(activation=MinMaxObserver.with_args(dtype=activation.dtype, qscheme=activation.qscheme,
                                                           reduce_range=activation.reduce_range),
                       weight=qconfig.weight)

    mapping.set_global(swapped(mapping.global_qconfig))
    for op, qconfig in list(mapping.object_type_qconfigs.items()):
        mapping.set_object_type(op, swapped(qconfig))
    return mapping


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
