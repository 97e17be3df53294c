"""`cpu-linear-formats`: a precision chosen per Linear layer among several CPU formats, for plans that may mix
more than two precisions (causal language models by default). A candidate is an item `layer@format`; a plan
gives each layer at most one of its items.

| format | kernel (real, measured in bench/results/llm.md)             | simulated as                               |
|--------|-------------------------------------------------------------|--------------------------------------------|
| int8   | oneDNN dynamic Linear, 8-bit activations (as dynamic-int8)  | per-channel int8 weights, 8-bit inputs     |
| int8wo | `torch._weight_int8pack_mm`: int8 weights, float activations | per-channel symmetric int8 weights         |
| int4wo | `torch._weight_int4pack_mm_for_cpu`: 4-bit weights in groups | asymmetric 4-bit weights, groups of 32     |
|        | of 32 along the input, float activations                     |                                            |

The weight-only kernels are called directly: they are what torchao's CPU int4 layout dispatches to, but that
layout does not run on this torch and CPU, and torchao's eager int8 weight-only config casts the weights back
to float and multiplies in float on every call (no int8 kernel), so neither measures what these formats cost.
Every format takes and returns float, so layers save independently (`shared_shape_profile`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import Plan
from .base import Backend, Candidates, Inputs, Simulation, hooks, int8_per_channel, join_item, split_item, swapped_weights
from .dynamic import ENGINE, FullRangeLinear, dynamic_8bit
from .profile import shared_shape_profile
from .registry import register

LINEAR_FORMATS = "cpu-linear-formats"
FORMATS = ("int8", "int8wo", "int4wo")
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
    codes, scale, zero = int4_groups(weight)
    rows, columns = weight.shape
    grouped = codes.reshape(rows, columns // GROUP, GROUP)
    return ((grouped - 8) * scale[..., None] + zero[..., None]).reshape(rows, columns).to(weight.dtype)


def int8_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 codes and scales, with the qparams of the int8 weight observer."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight.detach().float())
    scale, _ = observer.calculate_qparams()
    codes = torch.round(weight.detach().float() / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return codes, scale.float()


class WeightOnlyLinear(nn.Module):
    """A Linear with low-precision weights and float activations; its buffers are the packed weights, so its
    state dict is the artifact's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._matmul(x.reshape(-1, self.in_features).contiguous())
        out = flat.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int8WeightOnlyLinear(WeightOnlyLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        codes, scales = int8_symmetric(linear.weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.codes, self.scales)


class Int4WeightOnlyLinear(WeightOnlyLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        codes, scale, zero = int4_groups(linear.weight)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)


def low_module(linear: nn.Linear, precision: str) -> nn.Module:
    """The layer on the real kernel of `precision`."""
    if precision == "int8wo":
        return Int8WeightOnlyLinear(linear)
    if precision == "int4wo":
        return Int4WeightOnlyLinear(linear)
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.backends.quantized.engine = ENGINE
    source = copy.copy(linear)
    source.qconfig = per_channel_dynamic_qconfig
    return FullRangeLinear.from_float(source)


def supports(linear: nn.Linear, precision: str) -> bool:
    """The int4 kernel packs whole groups of inputs and outputs in multiples of 16."""
    return precision != "int4wo" or (linear.in_features % GROUP == 0 and linear.out_features % 16 == 0)


WEIGHTS = {"int8": int8_per_channel, "int8wo": int8_per_channel, "int4wo": int4_weight}
ACTIVATIONS = {"int8": dynamic_8bit}


class FormatSimulation(Simulation):
    """Each item's weight quantized once; an int8 item also quantizes its input on every call. Within one set of
    items a layer takes the last of its items."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear]):
        self.model, self.modules = model, modules
        self.low_weights = {item: WEIGHTS[split_item(item)[1]](m.weight) for item, m in modules.items()}

    def layer(self, item: str) -> str:
        return split_item(item)[0]

    def group(self, item: str) -> str:
        return split_item(item)[1]

    def _activation(self, item: str):
        return ACTIVATIONS.get(split_item(item)[1], lambda x: x)

    @contextlib.contextmanager
    def quantized(self, names: Iterable[str]):
        chosen = {self.layer(item): item for item in names}
        low = {self.modules[item]: self.low_weights[item] for item in chosen.values()}
        pre = [self.modules[item].register_forward_pre_hook(
            lambda _m, args, act=self._activation(item): (act(args[0]), *args[1:]))
            for item in chosen.values() if split_item(item)[1] in ACTIVATIONS]
        with swapped_weights(low), hooks(pre):
            yield

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return F.linear(self._activation(name)(x), self.low_weights[name], module.bias) - out


@register
class LinearFormats(Backend):
    priority = 12  # before dynamic-int8: it takes only requests for formats besides int8

    @classmethod
    def create(cls, offered: Candidates) -> "LinearFormats | None":
        if offered.device.startswith("cuda") or offered.runtime != "torch" or set(offered.formats) <= {"int8"}:
            return None
        unknown = set(offered.formats) - set(FORMATS)
        if unknown:
            return None
        items = [join_item(name, precision) for name in offered.linear() for precision in offered.formats
                 if supports(offered.layers[name], precision)]
        note = ("a format per Linear layer among " + ", ".join(offered.formats) + " (int8: oneDNN dynamic; int8wo, "
                "int4wo: weight-only CPU kernels with float activations)")
        return cls(LINEAR_FORMATS, note, offered.adapter, items, offered.adapter, dict(offered.skipped),
                   formats=tuple(offered.formats))

    low_module = staticmethod(low_module)  # what shared_shape_profile times per shape and format

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
        for name, precision in low.items():
            model.set_submodule(name, low_module(modules[name], precision))
        return model.eval()

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        modules = dict(self.adapter.named_modules())
        return FormatSimulation(self.adapter, {item: modules[split_item(item)[0]] for item in self.candidates})

