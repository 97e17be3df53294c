"""Kernel backends: how a `Plan` becomes a model on real low-precision kernels, and a simulation of
exactly that arithmetic for the sensitivity analysis (which tries many layer subsets, too many to build
real models for). One module per backend, each registering itself (`registry.py`):

| backend        | module           | where           | real kernels                       | simulated as                       |
|----------------|------------------|-----------------|------------------------------------|------------------------------------|
| dynamic-int8   | dynamic.py       | CPU, Linear     | `quantize_dynamic` on oneDNN       | per-channel int8 weights; inputs   |
|                |                  |                 |                                    | quantized per call to 8 bits       |
| fx-static-int8 | fx_static.py     | CPU, conv nets  | FX graph mode static int8, oneDNN  | the same FX graph, observers       |
|                |                  |                 |                                    | replaced by switchable fake-quants |
| torchao-*      | torchao_linear.py| CUDA, Linear    | torchao `quantize_` (int8 or fp8)  | per-token int8 / per-tensor fp8    |
| cpu-linear-    | linear_formats.py| CPU, Linear,    | per layer: oneDNN dynamic int8, or | per format: 8-bit inputs and/or    |
| formats        |                  | several formats | weight-only int8 / int4 kernels    | int8 / 4-bit-group weights         |
| onnxruntime-*  | onnx_runtime.py  | --runtime       | onnxruntime's quantizer, run in    | the torch backend's simulation     |
|                |                  | onnxruntime     | onnxruntime (dynamic or static)    |                                    |
| llama.cpp-gguf | gguf_types.py    | --runtime       | a GGML type per tensor, written by | llama.cpp's own quantized weights, |
|                |                  | llama.cpp (LMs) | llama.cpp's quantizer, run there   | inputs rounded as llama.cpp does   |

Every reported metric and latency comes from `Backend.build`; only the sensitivity analysis uses
`Backend.simulation`. `profile.py` measures what each layer saves.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil

import torch
from torch import nn

from .. import cost
from ..adapters import ModelAdapter, quantizable_layers
from ..plan import FOLDED_GRAPH, Plan
from .base import Backend, Candidates, Inputs, Simulation, capture_inputs, hooks, int8_per_channel, weighted
from .profile import LatencyProfile
from .registry import BACKENDS

# Every backend module registers itself on import.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .dynamic import DYNAMIC  # noqa: E402
from .fx_static import FX_STATIC, folded_graph  # noqa: E402
from .linear_formats import FORMATS as LINEAR_FORMAT_NAMES, INTEGER_FORMATS, LINEAR_FORMATS  # noqa: E402
from .gguf_types import RUNTIME as LLAMA_CPP  # noqa: E402
from .onnx_runtime import RUNTIME as ONNX_RUNTIME  # noqa: E402
from .torchao_linear import TORCHAO_FP8, TORCHAO_INT8  # noqa: E402

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WHOLE_CAST = "whole-cast"  # a plan that is the whole model cast to a 16-bit float (pipeline's reference)
UNUSED = "its output does not reach the model's output for this task, so quantizing it cannot change anything"

__all__ = ["BACKENDS", "WHOLE_CAST", "DYNAMIC", "FX_STATIC", "INTEGER_FORMATS", "LINEAR_FORMATS", "LINEAR_FORMAT_NAMES", "LLAMA_CPP", "ONNX_RUNTIME", "RUNTIMES", "TORCHAO_FP8", "TORCHAO_INT8", "Backend", "Inputs", "LatencyProfile",
           "Simulation", "WholeCast", "apply_plan", "backend_for", "capture_inputs", "choose_backend", "float_model", "hooks",
           "int8_per_channel", "unused_layers", "weighted"]


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
        cost.count("backward", len(example[0]))  # one forward and one backward of the example batch
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return [n for n, g in zip(names, grads) if g is None]


RUNTIMES = ("torch", "onnxruntime", "llama.cpp")


def choose_backend(adapter: ModelAdapter, device: str, example: Inputs, runtime: str = "torch",
                   formats: tuple[str, ...] = ("int8",), weight_only_activations: str = "fp32", **more) -> Backend:
    """The first registered backend, by priority, that takes this model on this device for this runtime in
    these low-precision formats (weight-only kernels with `weight_only_activations`); `more`: the rest of
    `Candidates` (a llama.cpp job's source file and workload)."""
    layers = quantizable_layers(adapter)
    skipped = {n: UNUSED for n in unused_layers(adapter, list(layers), example)}
    offered = Candidates(adapter, device, example, layers, skipped, runtime, tuple(formats), weight_only_activations,
                         **more)
    for backend in BACKENDS:
        chosen = backend.create(offered)
        if chosen is not None:
            if not chosen.several:
                chosen.formats = tuple(formats[:1])
            return chosen
    raise ValueError(f"no kernel backend takes this model on {device} in {', '.join(formats)}"
                     + ("" if runtime == "torch" else f" for {runtime}"))


def backend_for(adapter: ModelAdapter, plan: Plan, example: Inputs) -> Backend:
    """The backend a plan was made for, rebuilt on `adapter` (for re-applying a stored plan)."""
    if plan.backend.startswith("onnxruntime"):
        raise ValueError("an onnxruntime plan is delivered as model.onnx: run that file in onnxruntime")
    if plan.backend.startswith("llama.cpp"):
        raise ValueError("a llama.cpp plan is delivered as model.gguf: run that file in llama.cpp")
    backend = choose_backend(adapter, plan.device, example, formats=plan.formats,
                             weight_only_activations=plan.weight_only_activations)
    if backend.name != plan.backend:
        raise ValueError(f"the plan needs the {plan.backend} backend, but this model and device give {backend.name}")
    return backend


def float_model(adapter: nn.Module, precision: str, device: str) -> nn.Module:
    """The model in the baseline precision plans are compared against: fp32 on CPU, 16-bit on GPU."""
    return adapter.to(device=device, dtype=FLOAT_DTYPES[precision]).eval()


class WholeCast(nn.Module):
    """A float model cast whole to a 16-bit dtype (weights, activations, attention and norms alike), taking and
    returning what the original does: the "just cast it" execution a mixed plan must also beat."""

    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.precision, self.dtype = precision, FLOAT_DTYPES[precision]
        self.cast = copy.deepcopy(model).to(self.dtype).eval()

    @property
    def model(self) -> nn.Module:
        """The cast transformers model, where an adapter keeps its own (a language model's decode and prefill
        workloads call it directly, with its KV cache)."""
        return self.cast.model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        return self.cast(*cast).float()


def apply_plan(adapter: ModelAdapter, plan: Plan, calibration: list[Inputs]) -> nn.Module:
    """A new model with the plan's low-precision layers on real kernels; `adapter` is left untouched."""
    if plan.backend == WHOLE_CAST:
        return WholeCast(folded_graph(adapter) if plan.cast_of == FOLDED_GRAPH else adapter, plan.baseline_precision)
    return backend_for(adapter, plan, calibration[0]).build(plan, calibration)
