"""`torchao-int8` / `torchao-fp8`: CUDA Linear layers through torchao's `quantize_` with a per-module filter;
simulated as per-token symmetric int8 (or per-tensor e4m3) inputs and per-channel int8 (or per-tensor e4m3)
weights. No GPU was available where this was written: `bench/gpu_check.py` is its only check."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..plan import Plan
from .base import Backend, Candidates, Inputs, LinearSimulation, Simulation, int8_per_channel
from .profile import independent_profile
from .registry import register

TORCHAO_INT8 = "torchao-int8"
TORCHAO_FP8 = "torchao-fp8"


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (token), as torchao's dynamic int8 activations."""
    scale = x.detach().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def fp8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale per tensor, as torchao's default fp8 configuration."""
    scale = x.detach().abs().amax().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


@register
class TorchaoLinear(Backend):
    priority = 30  # every model on a GPU worker

    @classmethod
    def create(cls, offered: Candidates) -> "TorchaoLinear | None":
        if not offered.device.startswith("cuda") or not offered.int8_only:
            return None
        fp8 = torch.cuda.get_device_capability() >= (8, 9)
        convs = {n: "torchao quantizes Linear layers only" for n, m in offered.layers.items()
                 if not isinstance(m, nn.Linear)}
        return cls(TORCHAO_FP8 if fp8 else TORCHAO_INT8, "torchao per-module quantization of Linear layers",
                   offered.adapter, offered.linear(), offered.adapter, {**offered.skipped, **convs})

    profile = independent_profile  # its kernels take and return float: layers save independently

    @property
    def onnx_quantization(self) -> str | None:  # fp8 plans have no onnxruntime counterpart
        return "dynamic" if self.name == TORCHAO_INT8 else None

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
        modules = dict(self.adapter.named_modules())
        layers = {n: modules[n] for n in self.candidates}
        if self.name == TORCHAO_FP8:
            return LinearSimulation(self.adapter, layers, fp8_per_tensor, fp8_per_tensor)
        return LinearSimulation(self.adapter, layers, int8_per_channel, int8_per_token)
