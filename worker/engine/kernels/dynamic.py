"""`dynamic-int8`: CPU Linear layers through `quantize_dynamic` on the x86 engine (fbgemm), per-channel int8
weights, activations quantized per call with 7 bits (reduce_range). Simulated with the same qparams."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..plan import Plan
from .base import Backend, Candidates, Inputs, LinearSimulation, Simulation, int8_per_channel
from .profile import independent_profile
from .registry import register

DYNAMIC = "dynamic-int8"
ENGINE = "x86"


def dynamic_7bit(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine over [min(x, 0), max(x, 0)] with 128 levels, as fbgemm's dynamic Linear does
    (reduce_range=True): computed per call, like the kernel."""
    scale, zero_point = torch._choose_qparams_per_tensor(x.detach(), True)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 127)


@register
class DynamicInt8(Backend):
    priority = 10  # CPU models without convolutions (conv nets go to fx-static-int8 first)

    @classmethod
    def create(cls, offered: Candidates) -> "DynamicInt8 | None":
        if offered.device.startswith("cuda"):
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
                "dynamic int8 Linear kernels (per-channel weights, 7-bit activations)")
        return cls(DYNAMIC, note, offered.adapter, offered.linear(), offered.adapter, skipped, fallback=fallback)

    profile = independent_profile  # its kernels take and return float: layers save independently

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        low = plan.low_precision_layers
        if not low:
            return self.adapter
        torch.backends.quantized.engine = ENGINE
        return quantize_dynamic(copy.deepcopy(self.adapter).eval(), {n: per_channel_dynamic_qconfig for n in low},
                                dtype=torch.qint8)

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        modules = dict(self.adapter.named_modules())
        return LinearSimulation(self.adapter, {n: modules[n] for n in self.candidates}, int8_per_channel,
                                dynamic_7bit)
