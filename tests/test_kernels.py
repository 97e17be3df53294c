import copy

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_resnet, token_batch
from worker.engine.adapters import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION, ModelAdapter, adapt, quantizable_layers
from worker.engine.artifact import load_artifact, save_artifact
from worker.engine.kernels import DYNAMIC, FX_STATIC, apply_plan, capture_inputs, choose_backend, int8_per_channel
from worker.engine.kernels.dynamic import fake_activations
from worker.engine.plan import Plan


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_weight_quantizer_matches_the_int8_kernels_weights():
    w = torch.randn(6, 10) * torch.arange(1, 7)[:, None]
    q = int8_per_channel(w)
    scale = w.abs().amax(1, keepdim=True) / 127.5  # symmetric qint8 observer: max / ((127 - -128) / 2)
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # every value on the int8 grid of its row
    assert levels.min() >= -128 - 1e-4 and levels.max() <= 127 + 1e-4
    packed = torch.ao.nn.quantized.dynamic.Linear(10, 6)
    packed.set_weight_bias(torch.quantize_per_channel(w, scale.flatten(), torch.zeros(6, dtype=torch.long), 0,
                                                      torch.qint8), None)
    assert torch.equal(packed.weight().dequantize(), q)


class _OneLinear(ModelAdapter):
    input_names = ("x",)

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_dynamic_kernel_computes_exactly_what_its_activation_width_simulates(scale):
    """Whichever width a layer gets on this CPU (8 bits where its products are exact, 7 where they saturate, as
    random full-range weights and wide inputs make them without VNNI), kernel and simulation agree."""
    torch.manual_seed(3)
    linear = nn.Linear(384, 192)
    with torch.no_grad():
        linear.weight.normal_()
    x = torch.randn(8, 384) * scale
    chosen = choose_backend(_OneLinear(nn.Sequential(linear)).eval(), "cpu", (x,))
    chosen.fit([(x,)])
    module = dict(chosen.build(chosen.all_low(), [(x,)]).named_modules())["model.0"]
    assert module.bits == chosen.activation_bits["model.0"] in (7, 8)
    with torch.inference_mode():
        real = module(x)
        simulated = nn.functional.linear(fake_activations(x, module.bits), int8_per_channel(linear.weight),
                                         linear.bias)
    assert _relative_error(real, simulated) < 1e-4 < _relative_error(real, linear(x))


def test_dynamic_int8_linear_matches_float_within_int8_tolerance():
    adapter = adapt(tiny_bert(), FEATURE_EXTRACTION)
    inputs = adapter.inputs(token_batch())
    chosen = choose_backend(adapter, "cpu", inputs)
    backend, names = chosen.name, chosen.candidates
    assert backend == DYNAMIC and chosen.baseline is adapter
    name = names[3]
    plan = Plan(layers={n: "int8" if n == name else "fp32" for n in names}, backend=backend)
    chosen.fit([inputs])  # each layer's activation width, from the inputs it receives
    quantized = chosen.build(plan, [inputs])
    float_layer = quantizable_layers(adapter)[name]
    int8_layer = dict(quantized.named_modules())[name]
    assert isinstance(int8_layer, torch.ao.nn.quantized.dynamic.Linear)
    x = capture_inputs(adapter, [name], inputs)[name][0].clone()
    error = _relative_error(int8_layer(x), float_layer(x))
    assert error < 0.02  # int8 weights and activations: ~1% error
    seven = torch.ops.quantized.linear_dynamic(x, int8_layer._packed_params._packed_params, reduce_range=True)
    if int8_layer.bits == 8:  # 8-bit activations, where exact: half the error of the same kernel asked for 7
        assert error < 0.75 * _relative_error(seven, float_layer(x))
    else:  # its 8-bit products saturate on this CPU (no VNNI): the module asks for 7
        assert torch.equal(int8_layer(x), seven)
    assert type(quantizable_layers(adapter)[name]) is nn.Linear  # the original model is untouched


def test_fx_static_int8_conv_net_matches_float_and_skips_float_layers():
    adapter = adapt(tiny_resnet(), IMAGE_CLASSIFICATION)
    x = torch.randn(8, 1, 16, 16)
    chosen = choose_backend(adapter, "cpu", (x,))
    backend, names = chosen.name, chosen.candidates
    assert backend == FX_STATIC and len(names) == len(quantizable_layers(adapter))
    with torch.inference_mode():  # the baseline is the same network with BatchNorm folded, in fp32
        assert torch.allclose(chosen.baseline(x), adapter(x), atol=1e-5)
    keep_float = names[1]
    plan = Plan(layers={n: "fp32" if n == keep_float else "int8" for n in names}, backend=backend)
    calibration = [(torch.randn(8, 1, 16, 16),) for _ in range(4)] + [(x,)]
    quantized = chosen.build(plan, calibration)
    modules = dict(quantized.named_modules())
    assert ".quantized" not in type(modules[keep_float]).__module__  # float layer stays float (maybe fused)
    assert not any(p.is_quantized for p in modules[keep_float].state_dict().values())
    assert "quantized" in type(modules[names[2]]).__module__
    with torch.inference_mode():
        assert _relative_error(quantized(x), adapter(x)) < 0.1


def _int8_ops(model: torch.fx.GraphModule, example) -> dict[str, bool]:
    """For every op node of a converted FX model: does it produce a quantized tensor?"""
    quantized = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor) and node.op in ("call_module", "call_function", "call_method"):
                quantized[node.name] = out.is_quantized
            return out

    with torch.inference_mode():
        Recorder(model).run(*example)
    return quantized


def test_partial_fx_plan_keeps_element_wise_ops_float_unless_their_inputs_are_int8():
    adapter = adapt(tiny_resnet(), IMAGE_CLASSIFICATION)
    x = torch.randn(8, 1, 16, 16)
    backend = choose_backend(adapter, "cpu", (x,))
    names = backend.candidates
    calibration = [(torch.randn(8, 1, 16, 16),) for _ in range(3)]
    first = names[0]  # the stem conv, then ReLU (fused) and max-pooling
    ops = _int8_ops(backend.build(Plan(layers={n: "int8" if n == first else "fp32" for n in names},
                                       backend=backend.name), calibration), (x,))
    assert ops[first.replace(".", "_")]  # the int8 conv
    assert ops["model_resnet_embedder_pooler"]  # pooling of an int8 tensor stays int8
    adds = [name for name in ops if name.startswith("add")]
    assert adds and not any(ops[a] for a in adds)  # every residual add has a float input: float
    everything = _int8_ops(backend.build(Plan(layers={n: "int8" for n in names}, backend=backend.name),
                                         calibration), (x,))
    int8_adds = [name for name in everything if name.startswith("add")]  # add, or add_relu once fused
    assert len(int8_adds) == len(adds) and all(everything[a] for a in int8_adds)  # every layer int8: adds too


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
    chosen = choose_backend(adapter, "cpu", calibration[0])
    backend, names = chosen.name, chosen.candidates
    plan = Plan(layers={n: "int8" if i <= len(names) // 2 else "fp32" for i, n in enumerate(names)}, backend=backend)
    quantized = apply_plan(adapter, plan, calibration)
    save_artifact(quantized, plan, tmp_path)
    assert (tmp_path / "plan.json").exists() and (tmp_path / "model.safetensors").exists()

    fresh = copy.deepcopy(adapter)
    # One unrelated batch builds the graph; every stored scale must then override its observers.
    reloaded = load_artifact(fresh, tmp_path, tuple(t.clone() for t in calibration[-1]))
    probe = adapter.inputs(token_batch(seed=3)) if kind == "bert" else (torch.randn(8, 1, 16, 16),)
    with torch.inference_mode():
        difference = (reloaded(*probe) - quantized(*probe)).abs().max()
        assert difference == 0, float(difference)
    assert Plan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("kind", ["resnet", "bert"])
def test_simulation_switches_on_and_off_cleanly(kind):
    if kind == "resnet":
        adapter = adapt(tiny_resnet(), IMAGE_CLASSIFICATION)
        inputs = (torch.randn(8, 1, 16, 16),)
    else:
        adapter = adapt(tiny_bert(), FEATURE_EXTRACTION)
        inputs = adapter.inputs(token_batch())
    backend = choose_backend(adapter, "cpu", inputs)
    simulation = backend.simulation([inputs])
    with torch.inference_mode():
        before = simulation.model(*inputs).clone()
        assert torch.allclose(before, backend.baseline(*inputs), atol=1e-5)  # off: the float baseline
        with simulation.quantized(backend.candidates):
            during = simulation.model(*inputs).clone()
        after = simulation.model(*inputs)
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


def test_unused_layers_are_not_candidates():
    from transformers import BertModel

    model = BertModel(tiny_bert().config, add_pooling_layer=True).eval()  # the pooler feeds no embedding
    adapter = adapt(model, FEATURE_EXTRACTION)
    backend = choose_backend(adapter, "cpu", adapter.inputs(token_batch()))
    assert list(backend.skipped) == ["model.pooler.dense"]
    assert "model.pooler.dense" not in backend.candidates
    assert "does not reach the model's output" in backend.skipped["model.pooler.dense"]


def test_plan_rejects_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision"):
        Plan(layers={"a": "int3"})
