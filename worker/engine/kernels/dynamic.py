"""`dynamic-int8`: CPU Linear layers through `quantize_dynamic` on the oneDNN engine, per-channel int8 weights,
activations quantized per call with all 8 bits. Simulated with the same qparams.

Measured on all-MiniLM-L6-v2 with every Linear in int8 (bench/results/kernels.md): the x86 engine's (fbgemm)
dynamic Linear quantizes activations with 7 bits (`reduce_range`) for cosine 0.977 at 43% less latency;
asked for 8 bits it keeps 0.993 at 45%; oneDNN's, asked for 8 bits, keeps 0.993 at 59%. torchao's int8
dynamic-activation config needs `torch.compile` (33 s per model) to run at speed, too slow to build a model
per search step."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..plan import Plan
from .base import Backend, Candidates, Inputs, LinearSimulation, Simulation, int8_per_channel
from .profile import independent_profile
from .registry import register

DYNAMIC = "dynamic-int8"
ENGINE = "onednn"


def dynamic_8bit(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine over [min(x, 0), max(x, 0)] with 256 levels, as the dynamic Linear kernel quantizes
    its input on every call (reduce_range=False)."""
    scale, zero_point = torch._choose_qparams_per_tensor(x.detach(), False)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


class FullRangeLinear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 Linear, asking the kernel for 8-bit activations: the module hard-codes
    `reduce_range=True`, which fbgemm on CPUs without VNNI needs against int16 overflow; oneDNN does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                  reduce_range=False).to(x.dtype)


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
                "dynamic int8 Linear kernels on oneDNN (per-channel weights, 8-bit activations per call)")
        return cls(DYNAMIC, note, offered.adapter, offered.linear(), offered.adapter, skipped, fallback=fallback)

    profile = independent_profile  # its kernels take and return float: layers save independently

    def build(self, plan: Plan, calibration: list[Inputs]) -> nn.Module:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        low = plan.low_precision_layers
        if not low:
            return self.adapter
        torch.backends.quantized.engine = ENGINE
        return quantize_dynamic(copy.deepcopy(self.adapter).eval(), {n: per_channel_dynamic_qconfig for n in low},
                                dtype=torch.qint8, mapping={nn.Linear: FullRangeLinear})

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        modules = dict(self.adapter.named_modules())
        return LinearSimulation(self.adapter, {n: modules[n] for n in self.candidates}, int8_per_channel,
                                dynamic_8bit)
