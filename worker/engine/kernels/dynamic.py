"""`dynamic-int8`: CPU Linear layers through `quantize_dynamic` on the oneDNN engine, per-channel int8 weights,
activations quantized per call with 8 bits where the CPU computes them exactly (VNNI, AMX), else 7
(`activation_bits`, checked on this machine). Simulated with the same qparams.

Measured figures (all-MiniLM-L6-v2, every Linear in int8, and which machine) are in bench/results/kernels.md:
8-bit activations on oneDNN keep cosine 0.993 against 0.977 with 7 bits, on a CPU with VNNI. torchao's int8
dynamic-activation config needs `torch.compile` to run at speed, too slow to build a model per search step.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import Plan
from .base import Backend, Candidates, Inputs, LinearSimulation, Simulation, int8_per_channel
from .profile import independent_profile
from .registry import register

DYNAMIC = "dynamic-int8"
ENGINE = "onednn"


# Relative error of the 8-bit kernel against its exact simulation above which it is taken to saturate.
SATURATION = 1e-3


@functools.cache
def activation_bits() -> int:
    """8 where the dynamic kernel computes 8-bit activations exactly (CPUs with VNNI or AMX), else 7.

    Without VNNI the u8 x s8 products are summed in pairs into saturating int16 (vpmaddubsw): with 8-bit
    activations they overflow. Measured on an AVX2-only AMD EPYC (2026-12-05), a 576 -> 1536 layer on random
    inputs: 19.7% relative error with 8 bits against 1.8% with 7 (reduce_range), on oneDNN, x86 and fbgemm
    alike. So the kernel is checked once per process against the 8-bit simulation, on a probe layer."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 256)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(256, 576, generator=generator))
    x = torch.randn(16, 576, generator=generator)
    torch.backends.quantized.engine = ENGINE
    linear.qconfig = per_channel_dynamic_qconfig
    packed = torch.ao.nn.quantized.dynamic.Linear.from_float(linear)._packed_params._packed_params
    with torch.inference_mode():
        real = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)
        simulated = F.linear(_fake_activations(x, 8), int8_per_channel(linear.weight), linear.bias)
    return 8 if float((real - simulated).norm() / simulated.norm()) < SATURATION else 7


def _fake_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    scale, zero_point = torch._choose_qparams_per_tensor(x.detach(), bits == 7)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2 ** bits - 1)


def dynamic_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine over [min(x, 0), max(x, 0)], as the dynamic Linear kernel quantizes its input on every
    call: 256 levels, or 128 where this CPU's kernel needs the reduced range (`activation_bits`)."""
    return _fake_activations(x, activation_bits())


class FullRangeLinear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 Linear, asking the kernel for 8-bit activations where they are exact: the module
    hard-codes `reduce_range=True`, which CPUs without VNNI need against int16 overflow; VNNI and AMX do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                  reduce_range=activation_bits() == 7).to(x.dtype)


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
                f"dynamic int8 Linear kernels on oneDNN (per-channel weights, {activation_bits()}-bit activations "
                "per call)")
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
                                dynamic_activations)
