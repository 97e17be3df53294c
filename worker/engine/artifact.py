"""Saving a quantized model as safetensors + plan.json, and re-applying it in one call.

Quantized state dicts hold int8 tensors and packed-parameter tuples, which safetensors cannot store
directly: each is flattened into plain tensors plus a JSON description in the file's metadata.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import ModelAdapter
from .kernels import apply_plan
from .plan import Plan


def _flatten(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, object] = {}
    stored: dict[tuple, str] = {}  # a tensor's identity -> the key it is stored under

    def put(key: str, value) -> object:
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            # Tied weights (a language model's embedding and output projection) are one tensor under two
            # keys: stored once, the second key refers to the first (safetensors refuses shared memory).
            identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            if identity in stored:
                return {"same_as": stored[identity]}
            stored[identity] = key
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
        if "same_as" in spec:
            return tensors[spec["same_as"]]
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
    """Bytes of the serialised state dict: packed int8 weights count at their real size (an onnxruntime model:
    its file's)."""
    import io

    if hasattr(model, "size_bytes"):
        return model.size_bytes
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
