"""`cpu-linear-formats`: a precision chosen per Linear layer among several CPU formats, for plans that may mix
more than two precisions (causal language models by default, and any model where the worker's format menu
offers bf16). A candidate is an item `layer@format`; a plan gives each layer at most one of its items.

| format | kernel (real, measured in bench/results/llm.md)               | simulated as                                |
|--------|---------------------------------------------------------------|---------------------------------------------|
| int8   | oneDNN dynamic Linear, 8-bit activations (as dynamic-int8)    | per-channel int8 weights, 8-bit inputs      |
| int8wo | `torch._weight_int8pack_mm`: int8 weights, float activations  | the kernel's own symmetric int8 codes       |
| int4wo | `torch._weight_int4pack_mm_for_cpu`: 4-bit weights in groups  | asymmetric 4-bit weights, groups of 32      |
|        | of 32 along the input, float activations                       |                                             |
| bf16   | `F.linear` on bf16 weights and inputs (AVX-512 bf16 / AMX)     | bf16-rounded weights, inputs and outputs    |

The weight-only kernels take their activations (and scales) in the dtype the worker's format menu chose
(`menu.py`): bf16 where that is faster (AVX-512/AMX CPUs, where fp32 activations take a slow reference path),
fp32 elsewhere; the simulation rounds to bf16 where the kernel does. The plan records the choice
(`Plan.weight_only_activations`), so a plan re-applies with the arithmetic it was measured with.

The weight-only kernels are called directly: they are what torchao's CPU int4 layout dispatches to, but that
layout does not run on this torch and CPU, and torchao's eager int8 weight-only config casts the weights back
to float and multiplies in float on every call (no int8 kernel), so neither measures what these formats cost.
Every format takes and returns fp32, so layers save independently (`shared_shape_profile`).

Layers that read the same input one after another (a block's q/k/v projections, gate/up: found by one forward
pass, `shared_inputs`) and that a plan puts in the same weight-only format run as one kernel call on their
concatenated weights (`SharedInput`), each layer taking its columns of the output. The weight-only kernels
quantize and multiply each output row on its own, so the result is the same to the bit (a test checks); what it
saves is the per-call cost of these kernels, which dominates at one input row (a decoding step: 23-53 µs per
call for weights that take 2-10 µs to read). The float baseline runs the model as given, one call per layer.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..plan import Plan
from .base import Backend, Candidates, Inputs, Simulation, hooks, int8_per_channel, join_item, split_item
from .dynamic import activation_widths, fake_activations, int8_module, saturating_layers
from .profile import shared_shape_profile
from .registry import register

LINEAR_FORMATS = "cpu-linear-formats"
FORMATS = ("int8", "int8wo", "int4wo", "bf16")
# A language model's default menu (bf16 joins it where the worker's menu offers it: menu.Menu.formats_for).
INTEGER_FORMATS = ("int8", "int8wo", "int4wo")
ACTIVATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GROUP = 32  # int4 weights share a scale and zero point per 32 inputs


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes q in [0, 15] per group of GROUP inputs, with w ~ (q - 8) * scale + zero: the kernel's form."""
    rows, columns = weight.shape
    groups = weight.detach().float().reshape(rows, columns // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return codes.reshape(rows, columns), scale, low + 8 * scale


def int4_weight(weight: torch.Tensor) -> torch.Tensor:
    return int4_weight_in(weight, torch.float32)


def int8_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 codes and scales, with the qparams of the int8 weight observer."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight.detach().float())
    scale, _ = observer.calculate_qparams()
    codes = torch.round(weight.detach().float() / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return codes, scale.float()


class WeightOnlyLinear(nn.Module):
    """A Linear with low-precision weights, taking and returning fp32; the kernel runs with activations and
    scales in `dtype` (bf16 or fp32). Its buffers are the packed weights, so its state dict is the artifact's."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._matmul(x.reshape(-1, self.in_features).to(self.dtype).contiguous()).to(x.dtype)
        out = flat.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int8WeightOnlyLinear(WeightOnlyLinear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__(linear, dtype)
        codes, scales = int8_symmetric(linear.weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(dtype))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.codes, self.scales)


class Int4WeightOnlyLinear(WeightOnlyLinear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__(linear, dtype)
        codes, scale, zero = int4_groups(linear.weight)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)


class Bf16Linear(nn.Module):
    """A Linear whose weights, inputs and outputs are bf16 inside, fp32 outside (the 16-bit per-layer step)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


WEIGHT_ONLY = ("int8wo", "int4wo")  # kernels that quantize and multiply each output row on its own: fusable


class SharedInput(nn.Module):
    """Several layers' weights concatenated along their outputs on one low-precision kernel: one call serves all
    of them for the same input tensor (`ColumnsOf` gives each its columns)."""

    def __init__(self, low: nn.Module):
        super().__init__()
        self.low = low
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output) of the last call

    def output(self, x: torch.Tensor) -> torch.Tensor:
        # The same tensor object as the last call's: its siblings read it in turn (shared_inputs found them so).
        if self.last is None or self.last[0] is not x:
            self.last = x, self.low(x)
        return self.last[1]


class ColumnsOf(nn.Module):
    """One layer of a `SharedInput` group: its columns of the group's output. The group's first layer holds the
    group as a submodule (its weights are stored once); the others refer to it."""

    def __init__(self, shared: SharedInput, start: int, stop: int, holds: bool):
        super().__init__()
        if holds:
            self.shared = shared
        else:
            self.__dict__["shared"] = shared  # not registered: one copy of the weights in the state dict
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x)[..., self.start:self.stop]


def shared_inputs(model: nn.Module, layers: dict[str, nn.Linear], example: Inputs) -> list[tuple[str, ...]]:
    """Groups of layers called one after another on the same input tensor in one forward pass of `model` on the
    first sample of `example`, each layer called once."""
    calls: list[tuple[str, torch.Tensor]] = []
    with torch.inference_mode(), hooks([module.register_forward_pre_hook(
            lambda _m, args, name=name: calls.append((name, args[0]))) for name, module in layers.items()]):
        model(*(tensor[:1] for tensor in example))
    cost.count("forward", 1)
    once = {name for name, count in Counter(name for name, _ in calls).items() if count == 1}
    groups: list[list[str]] = []
    for position, (name, x) in enumerate(calls):
        if position and x is calls[position - 1][1] and name in once and groups[-1][-1] in once:
            groups[-1].append(name)
        else:
            groups.append([name])
    return [tuple(group) for group in groups if len(group) > 1]


def concatenated(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose outputs are `linears`' outputs side by side."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    joined = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None)
    with torch.no_grad():
        joined.weight.copy_(weight)
        if joined.bias is not None:
            joined.bias.copy_(torch.cat([linear.bias.detach() for linear in linears]))
    return joined


def low_module(linear: nn.Linear, precision: str, activations: torch.dtype = torch.float32) -> nn.Module:
    """The layer on the real kernel of `precision` (weight-only kernels with `activations`)."""
    if precision == "int8wo":
        return Int8WeightOnlyLinear(linear, activations)
    if precision == "int4wo":
        return Int4WeightOnlyLinear(linear, activations)
    if precision == "bf16":
        return Bf16Linear(linear)
    return int8_module(linear)


def supports(linear: nn.Linear, precision: str) -> bool:
    """The int4 kernel packs whole groups of inputs and outputs in multiples of 16."""
    return precision != "int4wo" or (linear.in_features % GROUP == 0 and linear.out_features % 16 == 0)


def int8_weight(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The int8 weight-only kernel's own codes times its scales (not the dynamic kernel's rounding)."""
    codes, scales = int8_symmetric(weight)
    return (codes.float() * scales.to(scale_dtype).float()[:, None]).to(weight.dtype)


def int4_weight_in(weight: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """int4 weights as the kernel dequantizes them with scales and zero points in `scale_dtype`."""
    codes, scale, zero = int4_groups(weight)
    rows, columns = weight.shape
    scale, zero = scale.to(scale_dtype).float(), zero.to(scale_dtype).float()
    grouped = codes.reshape(rows, columns // GROUP, GROUP)
    # One fused multiply-add per weight, as the kernel dequantizes (a separate multiply and add rounds twice).
    return torch.addcmul(zero[..., None], grouped - 8, scale[..., None]).reshape(rows, columns).to(weight.dtype)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def simulated_weights(activations: str) -> dict:
    """Each format's weights as its kernel multiplies them, weight-only kernels with activations (and scales)
    in `activations`. In bf16 the weight-only kernels dequantize with bf16 scales (and zero points) but keep
    the products and sums in fp32 (measured: the int8 kernel scales its fp32 sum of input times code; the int4
    kernel dequantizes by a fused multiply-add); only their input and output are rounded to bf16."""
    weights = {"int8": int8_per_channel, "int8wo": int8_weight, "int4wo": int4_weight, "bf16": bf16_round}
    if activations == "bf16":
        weights.update(int8wo=lambda w: int8_weight(w, torch.bfloat16),
                       int4wo=lambda w: int4_weight_in(w, torch.bfloat16))
    return weights


class FormatSimulation(Simulation):
    """Each item's weight quantized once; an int8 item also quantizes its input on every call; a bf16 item (and
    a weight-only item whose kernel runs in bf16) rounds its input and its product to bf16, as the kernel
    does: a bf16 Linear adds its bf16 bias inside, a weight-only module adds its fp32 bias after. Within one set
    of items a layer takes the last of its items."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear], activations: str = "fp32",
                 activation_bits: dict[str, int] | None = None):
        self.model, self.modules = model, modules
        self.activation_bits = activation_bits or {}  # per layer, its dynamic int8 kernel's activation width
        weights = simulated_weights(activations)
        self.in_bf16 = {"bf16"} | ({"int8wo", "int4wo"} if activations == "bf16" else set())
        self.low_weights = {item: weights[split_item(item)[1]](m.weight) for item, m in modules.items()}

    def layer(self, item: str) -> str:
        return split_item(item)[0]

    def group(self, item: str) -> str:
        return split_item(item)[1]

    def _output(self, item: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on the simulated kernel of `item`, from the layer's float input `x`."""
        precision, weight, bias = split_item(item)[1], self.low_weights[item], module.bias
        if precision == "int8":
            return F.linear(fake_activations(x, self.activation_bits.get(self.layer(item), 8)), weight, bias)
        if precision not in self.in_bf16:
            return F.linear(x, weight, bias)
        if precision == "bf16":
            return bf16_round(F.linear(bf16_round(x), weight, None if bias is None else bf16_round(bias)))
        product = bf16_round(F.linear(bf16_round(x), weight))
        return product if bias is None else product + bias

    @contextlib.contextmanager
    def quantized(self, names: Iterable[str]):
        chosen = {self.layer(item): item for item in names}.values()
        replaced = [self.modules[item].register_forward_hook(
            lambda module, args, _out, item=item: self._output(item, module, args[0])) for item in chosen]
        with hooks(replaced):
            yield

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self._output(name, module, x) - out


@register
@dataclass
class LinearFormats(Backend):
    priority = 12  # before dynamic-int8: it takes only requests for formats besides int8
    activations: str = "fp32"  # the weight-only kernels' activation and scale dtype (the worker's menu chose it)
    siblings: list[tuple[str, ...]] | None = field(default=None, repr=False)  # shared_inputs, found on first build

    @classmethod
    def create(cls, offered: Candidates) -> "LinearFormats | None":
        if offered.device.startswith("cuda") or offered.runtime != "torch" or set(offered.formats) <= {"int8"}:
            return None
        unknown = set(offered.formats) - set(FORMATS)
        if unknown:
            return None
        items = [join_item(name, precision) for name in offered.linear() for precision in offered.formats
                 if supports(offered.layers[name], precision)]
        activations = offered.weight_only_activations
        note = ("a format per Linear layer among " + ", ".join(offered.formats) + " (int8: oneDNN dynamic; int8wo, "
                f"int4wo: weight-only CPU kernels with {activations} activations and scales; bf16: a bf16 Linear)")
        return cls(LINEAR_FORMATS, note, offered.adapter, items, offered.adapter, dict(offered.skipped),
                   formats=tuple(offered.formats), activations=activations)

    def low_module(self, linear: nn.Linear, precision: str) -> nn.Module:
        """The layer on its real kernel (what shared_shape_profile times per shape and format)."""
        return low_module(linear, precision, ACTIVATION_DTYPES[self.activations])

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5, workload=None):
        return shared_shape_profile(self, calibration, seconds_per_layer, workload)

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        low = {name: precision for name, precision in plan.layers.items() if precision in FORMATS}
        if not low:
            return self.adapter
        # The float layers are shared with the baseline, not copied: a 135M-parameter model per plan would not fit.
        shared = {id(tensor): tensor for tensor in [*self.adapter.parameters(), *self.adapter.buffers()]}
        model = copy.deepcopy(self.adapter, shared)
        modules = dict(self.adapter.named_modules())
        fused = set()
        for group in self._fused_groups(low, modules, calibration):
            self._fuse(model, [modules[name] for name in group], group, low[group[0]])
            fused.update(group)
        for name, precision in low.items():
            if name in fused:
                continue
            module = self.low_module(modules[name], precision)
            if precision == "int8":
                module.bits = self.activation_bits.get(name, 8)
            model.set_submodule(name, module)
        return model.eval()

    def _fused_groups(self, low: dict[str, str], modules: dict[str, nn.Module],
                      calibration: list[Inputs]) -> list[tuple[str, ...]]:
        """The groups of layers sharing an input that the plan puts all in one weight-only format."""
        if not any(precision in WEIGHT_ONLY for precision in low.values()):
            return []
        if self.siblings is None:
            linears = {name: modules[name] for name in dict.fromkeys(split_item(i)[0] for i in self.candidates)}
            self.siblings = shared_inputs(self.adapter, linears, calibration[0])
        return [group for group in self.siblings if low.get(group[0]) in WEIGHT_ONLY
                and all(low.get(name) == low[group[0]] for name in group)
                and len({modules[name].bias is None for name in group}) == 1]

    def _fuse(self, model: nn.Module, linears: list[nn.Linear], names: tuple[str, ...], precision: str) -> None:
        shared = SharedInput(self.low_module(concatenated(linears), precision))
        start = 0
        for position, (name, linear) in enumerate(zip(names, linears)):
            model.set_submodule(name, ColumnsOf(shared, start, start + linear.out_features, holds=position == 0))
            start += linear.out_features

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        modules = dict(self.adapter.named_modules())
        return FormatSimulation(self.adapter, {item: modules[split_item(item)[0]] for item in self.candidates},
                                self.activations, self.activation_bits)

    def fit(self, calibration: list[Inputs]) -> None:
        layers = [split_item(item)[0] for item in self.candidates if split_item(item)[1] == "int8"]
        self.activation_bits = activation_widths(saturating_layers(self.adapter, layers, calibration[0]), layers)

