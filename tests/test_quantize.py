import copy

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_resnet, token_batch
from worker.engine.adapters import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION, adapt, quantizable_layers
from worker.engine.plan import Plan
from worker.engine.quantize import (DYNAMIC, FX_STATIC, apply_plan, choose_backend, fake_quantize_weight,
                                    load_artifact, save_artifact, simulated)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_weight_quantizer_is_int8_per_channel():
    w = torch.randn(6, 10) * torch.arange(1, 7)[:, None]
    q = fake_quantize_weight(w)
    scale = w.abs().amax(1, keepdim=True) / 127
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # every value on the int8 grid of its row
    assert levels.abs().max() <= 127 + 1e-4
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()


def test_dynamic_int8_linear_matches_float_within_int8_tolerance():
    adapter = adapt(tiny_bert(), FEATURE_EXTRACTION)
    inputs = adapter.inputs(token_batch())
    chosen = choose_backend(adapter, "cpu")
    backend, names = chosen.name, chosen.candidates
    assert backend == DYNAMIC and chosen.baseline is adapter
    name = names[3]
    plan = Plan(layers={n: "int8" if n == name else "fp32" for n in names}, backend=backend)
    quantized = apply_plan(adapter, plan, [inputs])
    float_layer = quantizable_layers(adapter)[name]
    int8_layer = dict(quantized.named_modules())[name]
    assert type(int8_layer).__module__.startswith("torch.ao.nn.quantized.dynamic")
    x = torch.randn(4, float_layer.in_features) * 3
    assert _relative_error(int8_layer(x), float_layer(x)) < 0.02  # int8 weights and activations: ~1% error
    assert type(quantizable_layers(adapter)[name]) is nn.Linear  # the original model is untouched


def test_fx_static_int8_conv_net_matches_float_and_skips_float_layers():
    adapter = adapt(tiny_resnet(), IMAGE_CLASSIFICATION)
    x = torch.randn(8, 1, 16, 16)
    chosen = choose_backend(adapter, "cpu")
    backend, names = chosen.name, chosen.candidates
    assert backend == FX_STATIC and len(names) == len(quantizable_layers(adapter))
    with torch.inference_mode():  # the baseline is the same network with BatchNorm folded, in fp32
        assert torch.allclose(chosen.baseline(x), adapter(x), atol=1e-5)
    keep_float = names[1]
    plan = Plan(layers={n: "fp32" if n == keep_float else "int8" for n in names}, backend=backend)
    calibration = [(torch.randn(8, 1, 16, 16),) for _ in range(4)] + [(x,)]
    quantized = apply_plan(adapter, plan, calibration)
    modules = dict(quantized.named_modules())
    assert ".quantized" not in type(modules[keep_float]).__module__  # float layer stays float (maybe fused)
    assert not any(p.is_quantized for p in modules[keep_float].state_dict().values())
    assert "quantized" in type(modules[names[2]]).__module__
    with torch.inference_mode():
        assert _relative_error(quantized(x), adapter(x)) < 0.1


@pytest.mark.parametrize("kind", ["resnet", "bert"])
def test_plan_reapplied_from_artifact_reproduces_outputs(tmp_path, kind):
    if kind == "resnet":
        adapter = adapt(tiny_resnet(), IMAGE_CLASSIFICATION)
        example = (torch.randn(8, 1, 16, 16),)
        calibration = [(torch.randn(8, 1, 16, 16),) for _ in range(3)]
    else:
        adapter = adapt(tiny_bert(num_labels=3), "sequence-classification")
        example = adapter.inputs(token_batch())
        calibration = [example]
    chosen = choose_backend(adapter, "cpu")
    backend, names = chosen.name, chosen.candidates
    plan = Plan.from_ordering(names, len(names) // 2 + 1, "int8", backend=backend)
    quantized = apply_plan(adapter, plan, calibration)
    save_artifact(quantized, plan, tmp_path)
    assert (tmp_path / "plan.json").exists() and (tmp_path / "model.safetensors").exists()

    fresh = copy.deepcopy(adapter)
    # One unrelated batch builds the graph; every stored scale must then override its observers.
    reloaded = load_artifact(fresh, tmp_path, tuple(t.clone() for t in calibration[-1]))
    probe = adapter.inputs(token_batch(seed=3)) if kind == "bert" else (torch.randn(8, 1, 16, 16),)
    with torch.inference_mode():
        assert torch.equal(reloaded(*probe), quantized(*probe))
    assert Plan.load(tmp_path / "plan.json") == plan


def test_simulation_restores_weights_and_hooks():
    adapter = adapt(tiny_bert(), FEATURE_EXTRACTION)
    inputs = adapter.inputs(token_batch())
    names = list(quantizable_layers(adapter))
    before = adapter(*inputs).detach()
    with simulated(adapter, names):
        during = adapter(*inputs).detach()
    after = adapter(*inputs).detach()
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


def test_plan_rejects_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision"):
        Plan(layers={"a": "int3"})
