"""`dynamic-int8`: CPU Linear layers through `quantize_dynamic` on the oneDNN engine, per-channel int8 weights,
activations quantized per call with 8 bits, or 7 for a layer whose 8-bit products saturate on this CPU
(`saturating_layers`, checked on the model's calibration inputs). Simulated with the same qparams.

Measured figures (all-MiniLM-L6-v2, every Linear in int8, each table naming its machine) are in
bench/results/kernels.md (a Xeon with AMX) and kernels-epyc.md (an AVX2 EPYC): 8-bit activations keep cosine
0.993 (0.992 on the EPYC) against 0.977 with 7 bits. torchao's int8
dynamic-activation config needs `torch.compile` to run at speed, too slow to build a model per search step.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..plan import Plan
from .base import Backend, Candidates, Inputs, LinearSimulation, Simulation, capture_inputs, int8_per_channel
from .profile import independent_profile
from .registry import register

DYNAMIC = "dynamic-int8"
ENGINE = "onednn"


# Relative error of a layer's 8-bit kernel against its exact simulation above which it is taken to saturate.
SATURATION = 1e-3


def fake_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-tensor affine over [min(x, 0), max(x, 0)], as the dynamic Linear kernel quantizes its input on every
    call: 256 levels, or 128 with the reduced range (bits 7)."""
    scale, zero_point = torch._choose_qparams_per_tensor(x.detach(), bits == 7)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2 ** bits - 1)


class FullRangeLinear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 Linear, asking the kernel for 8-bit activations where that layer's products are
    exact: the module hard-codes `reduce_range=True` (7 bits), which CPUs without VNNI need against int16
    overflow for some weights and inputs; with VNNI or AMX, and for most layers of trained models, 8 are exact.
    `bits` is set per layer by the backend (`saturating_layers`)."""

    bits = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                  reduce_range=self.bits == 7).to(x.dtype)


def int8_module(linear: nn.Linear, bits: int = 8) -> FullRangeLinear:
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.backends.quantized.engine = ENGINE
    source = copy.copy(linear)
    source.qconfig = per_channel_dynamic_qconfig
    module = FullRangeLinear.from_float(source)
    module.bits = bits
    return module


@torch.inference_mode()
def saturating_layers(adapter: nn.Module, names: list[str], example: Inputs) -> set[str]:
    """The layers whose 8-bit dynamic kernel does not compute what its exact 8-bit simulation does on the inputs
    they receive from one calibration batch. Without VNNI the kernel sums pairs of u8 x s8 products in
    saturating int16: measured on an AVX2-only AMD EPYC (2026-12-05), a random-weight 576 -> 1536 layer was
    19.7% off with 8 bits (1.8% with 7), while all-MiniLM-L6-v2 kept cosine 0.9924 with 8 bits against 0.9766
    with 7. So it is a property of the layer's weights and inputs on this CPU, checked per layer and model."""
    inputs = capture_inputs(adapter, names, example)
    cost.count("forward", len(example[0]))
    modules = dict(adapter.named_modules())
    saturating = set()
    for name in names:
        linear, x = modules[name], inputs[name][0]
        real = int8_module(linear, 8)(x)
        simulated = F.linear(fake_activations(x, 8), int8_per_channel(linear.weight), linear.bias)
        if float((real - simulated).norm() / simulated.norm().clamp(min=1e-12)) > SATURATION:
            saturating.add(name)
    return saturating


def activation_widths(saturating: set[str], names: list[str]) -> dict[str, int]:
    return {name: 7 if name in saturating else 8 for name in names}


@register
class DynamicInt8(Backend):
    priority = 10  # CPU models without convolutions (conv nets go to fx-static-int8 first)
    onnx_quantization = "dynamic"

    @classmethod
    def create(cls, offered: Candidates) -> "DynamicInt8 | None":
        if offered.device.startswith("cuda") or not offered.int8_only:
            return None
        return cls.linear_only(offered)

    @classmethod
    def linear_only(cls, offered: Candidates, skipped_convs: str | None = None,
                    fallback: str | None = None) -> "DynamicInt8":
        """Every used Linear layer; any other layer is skipped with `skipped_convs` as the reason."""
        skipped = dict(offered.skipped)
        if skipped_convs:
            skipped.update({n: skipped_convs for n, m in offered.layers.items() if not isinstance(m, nn.Linear)})
        note = ("dynamic int8 Linear kernels only" if fallback else
                "dynamic int8 Linear kernels on oneDNN (per-channel weights, 8-bit activations per call, 7 for a "
                "layer whose 8-bit products saturate on this CPU)")
        return cls(DYNAMIC, note, offered.adapter, offered.linear(), offered.adapter, skipped, fallback=fallback)

    profile = independent_profile  # its kernels take and return float: layers save independently

    def fit(self, calibration: list[Inputs]) -> None:
        self.activation_bits = activation_widths(saturating_layers(self.adapter, self.candidates, calibration[0]),
                                                 self.candidates)

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        low = plan.low_precision_layers
        if not low:
            return self.adapter
        torch.backends.quantized.engine = ENGINE
        model = quantize_dynamic(copy.deepcopy(self.adapter).eval(), {n: per_channel_dynamic_qconfig for n in low},
                                 dtype=torch.qint8, mapping={nn.Linear: FullRangeLinear})
        for name, module in model.named_modules():
            if isinstance(module, FullRangeLinear):
                module.bits = self.activation_bits.get(name, 8)
        return model

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        modules = dict(self.adapter.named_modules())
        return LinearSimulation(self.adapter, {n: modules[n] for n in self.candidates}, int8_per_channel,
                                {n: functools.partial(fake_activations, bits=self.activation_bits.get(n, 8))
                                 for n in self.candidates})
