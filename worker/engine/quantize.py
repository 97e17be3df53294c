"""Applying a `Plan` with real low-precision kernels, and saving/loading the result.

Kernel paths (chosen once per model by `choose_backend`):
- `fx-static-int8` (CPU, conv nets): FX graph-mode static int8 on the oneDNN engine, which has fast
  depthwise kernels (the x86 engine is ~7x slower on MobileNetV2). The plan picks which Conv/Linear
  layers run int8; element-wise ops (adds, activations, pooling) run int8 in every quantized plan,
  because FX mis-handles per-layer configs on residual paths (a quantized tensor reaches a float add
  through an identity shortcut). The baseline is the same FX graph in fp32 with BatchNorm folded, so
  the comparison is graph against graph, not int8 against unfused eager.
- `dynamic-int8` (CPU, Linear-only models such as BERT): per-channel dynamic int8 Linear kernels.
- `torchao-int8` / `torchao-fp8` (CUDA): torchao `quantize_` with a per-module filter over a 16-bit baseline.

The sensitivity analysis never uses these: it uses `simulated`, a cheap weight-and-activation
fake quantization, because it must try hundreds of layer subsets. Every reported metric and latency
comes from `apply_plan`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import ModelAdapter, quantizable_layers
from .plan import Plan

FX_STATIC = "fx-static-int8"
DYNAMIC = "dynamic-int8"
TORCHAO_INT8 = "torchao-int8"
TORCHAO_FP8 = "torchao-fp8"
ENGINES = {FX_STATIC: "onednn", DYNAMIC: "x86"}


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Q(W): symmetric per-output-channel int8, as the int8 kernels store weights, returned dequantized."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127)
    return (q * scale[:, None]).reshape(weight.shape)


def _fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine uint8 over the observed range, as dynamic/static int8 activations are."""
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (high - low).clamp(min=1e-12) / 255.0
    zero_point = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


@contextlib.contextmanager
def simulated(adapter: nn.Module, names, layers: dict[str, nn.Module] | None = None):
    """Temporarily run `names` as int8 (fake-quantized weights and inputs); restores everything on exit."""
    layers = layers or quantizable_layers(adapter)
    saved, hooks = {}, []
    try:
        for name in names:
            module = layers[name]
            saved[name] = module.weight.data
            module.weight.data = fake_quantize_weight(module.weight.data)
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args: (_fake_quantize_activation(args[0]), *args[1:])))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for name, weight in saved.items():
            layers[name].weight.data = weight


@dataclass
class Backend:
    name: str
    note: str
    candidates: list[str]  # layer names in network order
    baseline: nn.Module  # the float model plans are timed against, in the same execution mode


def choose_backend(adapter: ModelAdapter, device: str) -> Backend:
    layers = quantizable_layers(adapter)
    linear = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    if device.startswith("cuda"):
        fp8 = torch.cuda.get_device_capability() >= (8, 9)
        return Backend(TORCHAO_FP8 if fp8 else TORCHAO_INT8, "torchao per-module quantization of Linear layers",
                       linear, adapter)
    if not any(isinstance(m, nn.Conv2d) for m in layers.values()):
        return Backend(DYNAMIC, "dynamic int8 Linear kernels", linear, adapter)
    from torch.ao.quantization.quantize_fx import fuse_fx

    try:
        fused = fuse_fx(copy.deepcopy(adapter).eval())
    except Exception as exc:  # FX cannot trace every architecture; Linear layers still quantize dynamically
        note = f"convolutions stay fp32: the model is not FX-traceable ({type(exc).__name__}: {str(exc)[:160]})"
        return Backend(DYNAMIC, note, linear, adapter)
    return Backend(FX_STATIC, "FX static int8 (oneDNN) for Conv2d and Linear; baseline: same graph, fp32, "
                   "BatchNorm folded", list(layers), fused)


def _fx_quantize(adapter: nn.Module, float_layers: list[str], calibration: list[tuple[torch.Tensor, ...]]):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = ENGINES[FX_STATIC]
    mapping = get_default_qconfig_mapping(ENGINES[FX_STATIC])
    for name in float_layers:
        mapping.set_module_name(name, None)
    prepared = prepare_fx(copy.deepcopy(adapter).eval(), mapping, calibration[0])
    with torch.inference_mode():
        for inputs in calibration:
            prepared(*inputs)
    return convert_fx(prepared)


def _dynamic_quantize(adapter: nn.Module, low_layers: list[str]):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = ENGINES[DYNAMIC]
    return quantize_dynamic(copy.deepcopy(adapter).eval(), {n: per_channel_dynamic_qconfig for n in low_layers},
                            dtype=torch.qint8)


def _torchao_quantize(adapter: nn.Module, low_layers: list[str], backend: str, device: str, dtype: torch.dtype):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, quantize_)

    config = Float8DynamicActivationFloat8WeightConfig() if backend == TORCHAO_FP8 else \
        Int8DynamicActivationInt8WeightConfig()
    model = copy.deepcopy(adapter).to(device=device, dtype=dtype).eval()
    wanted = set(low_layers)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted and isinstance(module, nn.Linear))
    return model


FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def float_model(adapter: nn.Module, precision: str, device: str) -> nn.Module:
    """The model in the baseline precision plans are compared against: fp32 on CPU, 16-bit on GPU."""
    return adapter.to(device=device, dtype=FLOAT_DTYPES[precision]).eval()


def apply_plan(adapter: ModelAdapter, plan: Plan, calibration: list[tuple[torch.Tensor, ...]]) -> nn.Module:
    """A new model with the plan's low-precision layers on real kernels; `adapter` is left untouched.

    `calibration` feeds static activation observers (FX path); other paths only need it for nothing.
    """
    low = plan.low_precision_layers
    if not low:
        return adapter
    if plan.backend == FX_STATIC:
        return _fx_quantize(adapter, [n for n in plan.layers if n not in set(low)], calibration)
    if plan.backend == DYNAMIC:
        return _dynamic_quantize(adapter, low)
    if plan.backend in (TORCHAO_INT8, TORCHAO_FP8):
        return _torchao_quantize(adapter, low, plan.backend, plan.device, FLOAT_DTYPES[plan.baseline_precision])
    raise ValueError(f"unknown quantization backend {plan.backend!r}")


# Artifacts: quantized state dicts hold int8 tensors and packed-parameter tuples, which safetensors
# cannot store directly. Each is flattened into plain tensors plus a JSON description in the metadata.

def _flatten(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, object] = {}

    def put(key: str, value) -> object:
        if isinstance(value, torch.Tensor) and value.is_quantized:
            tensors[f"{key}.int_repr"] = value.int_repr().contiguous()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                tensors[f"{key}.scales"] = value.q_per_channel_scales().contiguous()
                tensors[f"{key}.zero_points"] = value.q_per_channel_zero_points().contiguous()
                return {"q": "per_channel", "axis": value.q_per_channel_axis()}
            return {"q": "per_tensor", "scale": value.q_scale(), "zero_point": value.q_zero_point()}
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
            return {"t": True}
        if isinstance(value, tuple):
            return {"tuple": [put(f"{key}.{i}", item) for i, item in enumerate(value)]}
        if value is None:
            return {"none": True}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value)}
        raise TypeError(f"cannot store {key} of type {type(value).__name__}")

    for key, value in state.items():
        layout[key] = put(key, value)
    return tensors, layout


def _unflatten(tensors: dict[str, torch.Tensor], layout: dict[str, object]) -> dict:
    def get(key: str, spec: dict):
        if "tuple" in spec:
            return tuple(get(f"{key}.{i}", item) for i, item in enumerate(spec["tuple"]))
        if spec.get("none"):
            return None
        if spec.get("t"):
            return tensors[key]
        if "q" in spec:
            ints = tensors[f"{key}.int_repr"]  # int8 -> qint8, uint8 -> quint8: the dtype travels with it
            if spec["q"] == "per_channel":
                return torch._make_per_channel_quantized_tensor(
                    ints, tensors[f"{key}.scales"], tensors[f"{key}.zero_points"], spec["axis"])
            return torch._make_per_tensor_quantized_tensor(ints, spec["scale"], spec["zero_point"])
        return getattr(torch, spec["dtype"].removeprefix("torch."))

    return {key: get(key, spec) for key, spec in layout.items()}


ARTIFACT_WEIGHTS = "model.safetensors"
ARTIFACT_PLAN = "plan.json"


def save_artifact(model: nn.Module, plan: Plan, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors, layout = _flatten(model.state_dict())
    weights = directory / ARTIFACT_WEIGHTS
    save_file(tensors, weights, metadata={"format": "mixq.quantized/1", "layout": json.dumps(layout)})
    plan.save(directory / ARTIFACT_PLAN)
    return {"weights": weights, "plan": directory / ARTIFACT_PLAN}


def load_artifact(adapter: ModelAdapter, directory: Path, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """Re-apply `plan.json` to the original model in one call and load the stored quantized weights.

    The stored tensors include every activation scale, so one example batch is enough to build the graph.
    """
    plan = Plan.load(directory / ARTIFACT_PLAN)
    model = apply_plan(adapter, plan, [example])
    from safetensors import safe_open

    with safe_open(directory / ARTIFACT_WEIGHTS, framework="pt") as handle:
        layout = json.loads(handle.metadata()["layout"])
    state = OrderedDict(_unflatten(load_file(directory / ARTIFACT_WEIGHTS), layout))
    # Module versions steer how quantized modules read their keys; the rebuilt model has the same ones.
    state._metadata = getattr(model.state_dict(), "_metadata", None)
    model.load_state_dict(state)
    return model


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the serialised state dict: packed int8 weights count at their real size."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
