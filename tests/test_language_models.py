"""Causal language models: text windows, the perplexity budget, formats per layer (kernels, their simulation,
the frontier the search walks) and the whole pipeline on a tiny Llama and on builtin:smollm2-135m."""

import math
import random

import pytest
import torch
from torch import nn

from worker.engine.adapters import ModelAdapter
from worker.engine.data import DataOptions, token_windows
from worker.engine.kernels import choose_backend
from worker.engine.kernels.linear_formats import FORMATS, INTEGER_FORMATS, low_module
from worker.engine.plan import Plan
from worker.engine.search import Budget, cost_aware_order, frontier_order


class CharTokenizer:
    """One token per character: enough to cut documents into windows without a tokenizer file."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 64 for c in text]}


def test_token_windows_keep_every_document_in_one_split():
    documents = [chr(65 + i) * (10 + 7 * i) for i in range(20)]  # document i is one letter, 10 + 7i long
    data = token_windows(CharTokenizer(), documents, DataOptions(calibration_samples=8, eval_samples=8,
                                                                 test_samples=8, batch_size=4, seq_len=8), "letters")
    seen = {}
    for split in ("calibration", "evaluation", "test"):
        windows = torch.cat([b["input_ids"] for b in getattr(data, split)])
        assert windows.shape[1] == 8 and len(windows) == data.sizes[split] > 0
        for window in windows.tolist():
            assert len(set(window)) == 1  # a window never spans two documents
            assert seen.setdefault(window[0], split) == split  # nor does a document span two splits
    assert data.labelled


def test_too_little_text_is_a_clear_error():
    from worker.engine.errors import InputError

    with pytest.raises(InputError, match="need at least one document per split"):
        token_windows(CharTokenizer(), ["short", "x" * 40], DataOptions(seq_len=16), "tiny")


def test_perplexity_budget_is_the_relative_increase_of_exp_minus_log_likelihood():
    budget = Budget(0.05, mode="perplexity")
    baseline = [-3.0, -3.2, -2.8, -3.1]
    plan = [-3.04, -3.21, -2.85, -3.12]
    drop, stderr = budget.paired(baseline, plan)
    mean_b, mean_p = sum(baseline) / 4, sum(plan) / 4
    assert drop == pytest.approx(math.exp(-mean_p) / math.exp(-mean_b) - 1)
    differences = [b - p for b, p in zip(baseline, plan)]
    mean_d = sum(differences) / 4
    sd = math.sqrt(sum((d - mean_d) ** 2 for d in differences) / 3)
    assert stderr == pytest.approx(sd / 2 * (1 + drop))  # the delta method on expm1
    assert budget.accepts(0.049) and not budget.accepts(0.051)


def _brute_force_best(layers, cost, saving, budget_cost):
    """The most saving whose total cost fits, over every choice of at most one item per layer."""
    best = 0.0
    choices = [[None, *items] for items in layers.values()]

    def walk(index, spent, saved):
        nonlocal best
        if spent > budget_cost + 1e-12:
            return
        if index == len(choices):
            best = max(best, saved)
            return
        for item in choices[index]:
            walk(index + 1, spent + (cost[item] if item else 0), saved + (saving[item] if item else 0))
    walk(0, 0.0, 0.0)
    return best


def test_frontier_prefixes_are_valid_plans_and_at_hull_points_optimal():
    rng = random.Random(3)
    for _ in range(30):
        layers = {f"l{i}": [f"l{i}@{f}" for f in FORMATS] for i in range(4)}
        cost = {item: rng.uniform(0, 1) for items in layers.values() for item in items}
        saving = {item: rng.uniform(-0.2, 1) for items in layers.values() for item in items}
        order = frontier_order(layers, cost, saving)
        assert all(saving[item] > 0 for item in order)
        for k in range(1, len(order) + 1):  # a prefix gives each layer its last item: cost and saving only grow
            plan = {item.split("@")[0]: item for item in order[:k]}
            previous = {item.split("@")[0]: item for item in order[:k - 1]}
            assert sum(saving[i] for i in plan.values()) > sum(saving[i] for i in previous.values())
        # The whole order ends at each layer's largest saving.
        final = {item.split("@")[0]: item for item in order}
        for layer, items in layers.items():
            saving_items = [i for i in items if saving[i] > 0]
            if saving_items:
                assert final[layer] == max(saving_items, key=saving.get)
        # A prefix's plan is optimal for its own cost among the hull's mixes (the LP relaxation): never beaten by
        # more than one layer's saving by any choice of items within that cost.
        plan = {item.split("@")[0]: item for item in order[:len(order) // 2]}
        spent, saved = sum(cost[i] for i in plan.values()), sum(saving[i] for i in plan.values())
        assert saved >= _brute_force_best(layers, cost, saving, spent) - max(saving.values())


def test_with_one_format_the_frontier_is_the_ratio_rule():
    names = [f"l{i}" for i in range(8)]
    rng = random.Random(0)
    cost = {n: rng.uniform(0.01, 1) for n in names}
    saving = {n: rng.uniform(0.01, 1) for n in names}
    assert frontier_order({n: [n] for n in names}, cost, saving) == cost_aware_order(names, cost, saving)


class Tiny(ModelAdapter):
    input_names = ("x",)

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("activations", ["fp32", "bf16"])
@pytest.mark.parametrize("precision", FORMATS)
def test_each_format_runs_a_real_kernel_that_its_simulation_reproduces(precision, activations):
    torch.manual_seed(0)
    adapter = Tiny(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))).eval()
    x = torch.randn(2, 5, 64)
    other = "int4wo" if precision == "int8wo" else "int8wo"
    backend = choose_backend(adapter, "cpu", (x,), formats=(precision, other), weight_only_activations=activations)
    backend.fit([(x,)])  # as the pipeline does: each int8 layer's activation width on this CPU
    assert backend.name == "cpu-linear-formats" and len(backend.candidates) == 4
    items = [f"model.0@{other}", f"model.0@{precision}", f"model.2@{precision}"]  # the last item of a layer wins
    plan = Plan(layers={**{n: "fp32" for n in backend.layers}, **backend.assignment(items)}, backend=backend.name)
    assert plan.layers == {"model.0": precision, "model.2": precision}
    built = backend.build(plan, [(x,)])
    kernels = {type(m).__name__ for m in built.modules()}
    assert {"int8": "FullRangeLinear", "int8wo": "Int8WeightOnlyLinear", "int4wo": "Int4WeightOnlyLinear",
            "bf16": "Bf16Linear"}[precision] \
        in kernels and "Linear" not in kernels
    simulation = backend.simulation([(x,)])
    with torch.inference_mode():
        real = built(x)
        with simulation.quantized(items):
            simulated = adapter(x)
        exact = adapter(x)
    assert not torch.allclose(real, exact, atol=1e-5)  # the format changes the arithmetic
    # Outputs rounded to bf16 differ by the kernel's accumulation order: up to one bf16 step (2^-7 relative).
    in_bf16 = precision == "bf16" or (activations == "bf16" and precision in ("int8wo", "int4wo"))
    assert torch.allclose(real, simulated, atol=(2 ** -7 if in_bf16 else 2e-3) * exact.abs().max())


def test_weight_only_artifacts_reload_to_the_same_outputs(tmp_path):
    from worker.engine.artifact import load_artifact, save_artifact

    torch.manual_seed(1)
    adapter = Tiny(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))).eval()
    x = torch.randn(3, 64)
    backend = choose_backend(adapter, "cpu", (x,), formats=FORMATS)
    plan = Plan(layers=backend.assignment(["model.0@int4wo", "model.2@int8wo"]), backend=backend.name,
                choices=list(FORMATS))
    built = backend.build(plan, [(x,)])
    save_artifact(built, plan, tmp_path)
    fresh = Tiny(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))).eval()
    fresh.load_state_dict(adapter.state_dict())
    loaded = load_artifact(fresh, tmp_path, (x,))
    with torch.inference_mode():
        assert torch.equal(loaded(x), built(x))


def test_a_language_model_cast_whole_saves_its_tied_weights_once_and_reloads_and_decodes(tmp_path):
    """The bf16 cast of a model whose output projection is its embedding (tied, as SmolLM2's and Gemma's are) is
    an artifact that reloads to the same outputs, and the generation workloads run on it."""
    from worker.engine import generation
    from worker.engine.adapters import CausalLM
    from worker.engine.artifact import load_artifact, save_artifact
    from worker.engine.kernels import WHOLE_CAST, WholeCast

    def tied():
        model = _tiny_llama()
        model.config.tie_word_embeddings = True
        model.tie_weights()
        return CausalLM(model).eval()

    adapter = tied()
    assert adapter.model.lm_head.weight is adapter.model.model.embed_tokens.weight
    cast = WholeCast(adapter, "bf16")
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    save_artifact(cast, Plan(layers={}, backend=WHOLE_CAST, baseline_precision="bf16"), tmp_path)
    fresh = tied()
    fresh.load_state_dict(adapter.state_dict())
    loaded = load_artifact(fresh, tmp_path, (tokens,))
    assert isinstance(loaded, WholeCast)
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), cast(tokens))
    for kind in generation.GENERATION_LATENCIES:
        assert generation.workload(kind, (tokens,)).call(loaded)().shape == (1,)


@pytest.mark.parametrize("activations", ["fp32", "bf16"])
def test_layers_reading_one_input_in_one_weight_only_format_run_as_one_call_with_the_same_bits(tmp_path, activations):
    """A block's q/k/v (and gate/up) in one weight-only format run as one kernel call on their concatenated
    weights: the outputs equal the layer-by-layer build's to the bit, the state dict holds each weight once, the
    artifact reloads, and a group whose layers the plan splits across formats stays layer by layer."""
    from worker.engine import generation
    from worker.engine.adapters import CausalLM
    from worker.engine.artifact import load_artifact, save_artifact
    from worker.engine.kernels.linear_formats import ColumnsOf

    adapter = CausalLM(_tiny_llama()).eval()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    backend = choose_backend(adapter, "cpu", (tokens,), formats=INTEGER_FORMATS, weight_only_activations=activations)
    block = "model.model.layers.{}.{}"
    low = {**{block.format(0, f"self_attn.{p}_proj"): "int4wo" for p in "qkv"},
           **{block.format(i, f"mlp.{p}_proj"): "int8wo" for i in (0, 1) for p in ("gate", "up")},
           block.format(1, "self_attn.q_proj"): "int4wo", block.format(1, "self_attn.k_proj"): "int4wo",
           block.format(1, "self_attn.v_proj"): "int8wo"}
    plan = Plan(layers={**{n: "fp32" for n in backend.layers}, **low}, backend=backend.name,
                choices=list(INTEGER_FORMATS), weight_only_activations=activations)
    built = backend.build(plan, [(tokens,)])
    # The groups, found by one forward pass: every block's q/k/v and gate/up, whatever the plan.
    expected = {tuple(block.format(i, f"self_attn.{p}_proj") for p in "qkv") for i in (0, 1)} | \
        {(block.format(i, "mlp.gate_proj"), block.format(i, "mlp.up_proj")) for i in (0, 1)}
    assert set(backend.siblings) == expected
    modules = dict(built.named_modules())
    fused = {name for name, module in modules.items() if isinstance(module, ColumnsOf)}
    assert fused == {*(block.format(0, f"self_attn.{p}_proj") for p in "qkv"),
                     *(block.format(i, f"mlp.{p}_proj") for i in (0, 1) for p in ("gate", "up"))}
    layer_by_layer = choose_backend(adapter, "cpu", (tokens,), formats=INTEGER_FORMATS,
                                    weight_only_activations=activations)
    layer_by_layer.siblings = []
    separate = layer_by_layer.build(plan, [(tokens,)])
    assert not any(isinstance(module, ColumnsOf) for module in separate.modules())
    with torch.inference_mode():
        assert torch.equal(built(tokens), separate(tokens))
    # Each group's weights once: the first layer holds them, its siblings refer to them.
    keys = list(built.state_dict())
    assert sum(key.startswith(block.format(0, "self_attn.")) and ".shared.low." in key for key in keys) == \
        len(dict(modules[block.format(0, "self_attn.q_proj")].shared.low.named_buffers()))
    save_artifact(built, plan, tmp_path)
    fresh = CausalLM(_tiny_llama()).eval()
    loaded = load_artifact(fresh, tmp_path, (tokens,))
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), built(tokens))
        for kind in generation.GENERATION_LATENCIES:
            assert generation.workload(kind, (tokens,)).call(loaded)().shape == (1,)


def test_int4_needs_whole_groups_of_inputs():
    from worker.engine.kernels.linear_formats import supports

    assert supports(nn.Linear(64, 16), "int4wo")
    assert not supports(nn.Linear(60, 16), "int4wo") and not supports(nn.Linear(64, 8), "int4wo")
    assert supports(nn.Linear(60, 8), "int8wo")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert low_module(nn.Linear(64, 16), "int4wo")(x).shape == (3, 16)


def _options(cache_dir, **overrides):
    from worker.engine import CompressOptions, DataOptions, LatencyOptions, SensitivityOptions

    return CompressOptions(**{
        "budget": Budget(0.05, confidence=0.5),
        "sensitivity": SensitivityOptions(ordering="hessian", hutchinson_max_samples=4, hessian_batches=1,
                                          interlayer_batches=1),
        "data": DataOptions(calibration_samples=8, eval_samples=16, test_samples=16, seq_len=16, batch_size=8),
        "latency": LatencyOptions(warmup=1, repeats=3, profile_seconds=0.02),
        "cache_dir": cache_dir, **overrides})


def _default_formats(report) -> tuple[str, ...]:
    """A language model's default menu: the integer formats, and bf16 where this worker's probe found it native."""
    return INTEGER_FORMATS + (("bf16",) if "bf16" in report.backend["menu"]["floats"] else ())


def _consistent(report, formats):
    """What any language-model report must say, whatever the plan."""
    assert report.task == "text-generation" and report.backend["formats"] == list(formats)
    assert set(report.plan.layers.values()) <= {"fp32", *formats}
    for row in report.layers:  # one row per layer and format; a row is low only where the plan chose its format
        layer, precision = row["name"].rsplit("@", 1)
        assert row["precision"] == (precision if report.plan.layers[layer] == precision else "fp32")
    decode = report.generation["decode"]
    assert decode["baseline_tokens_per_second"] == pytest.approx(1000 / decode["baseline_ms"])
    assert report.search["latency_workload"]["name"] == "decode"
    assert report.generation["memory"]["kv_cache_bytes"] > 0


def test_smollm2_builtin_gets_a_perplexity_budget_and_a_plan_in_several_formats(cache_dir, monkeypatch):
    from conftest import timed_as
    from worker.engine import DataOptions, compress, pipeline

    monkeypatch.setattr(pipeline, "paired", timed_as(0.6))  # the final timing: not what this test is about
    report = compress("builtin:smollm2-135m", _options(cache_dir, data=DataOptions(
        calibration_samples=8, eval_samples=8, test_samples=8, seq_len=8, batch_size=8)))
    _consistent(report, _default_formats(report))
    assert report.metric["name"] == "log_likelihood" and report.budget["mode"] == "perplexity"
    perplexity = report.metric["perplexity"]
    assert perplexity["baseline"] == pytest.approx(math.exp(-report.baseline.metric))
    assert perplexity["final"] == pytest.approx(math.exp(-report.final.metric))
    assert report.final.drop == pytest.approx(perplexity["final"] / perplexity["baseline"] - 1)
    assert len({row["name"].rsplit("@", 1)[0] for row in report.layers}) == 211  # 30 blocks x 7 and the head
    if report.status == "compressed":
        assert report.final.drop <= 0.05 and report.plan.low_precision_layers
    assert report.exports == {}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_a_local_causal_lm_without_text_is_scored_on_next_token_agreement(tmp_path, cache_dir, monkeypatch):
    from conftest import timed_as
    from worker.engine import DataOptions, compress, pipeline

    monkeypatch.setattr(pipeline, "paired", timed_as(0.6))
    _tiny_llama().save_pretrained(tmp_path / "tiny")
    report = compress("local:tiny", _options(
        cache_dir, model_root=tmp_path, generation_latency="prefill",
        data=DataOptions(synthetic=True, calibration_samples=16, eval_samples=16, test_samples=16, seq_len=16,
                         batch_size=8)))
    assert report.metric["name"] == "next_token_agreement" and report.budget["mode"] == "relative"
    assert report.search["latency_workload"]["name"] == "prefill"
    formats = _default_formats(report)
    assert set(report.plan.layers.values()) <= {"fp32", *formats} and len(report.layers) == len(formats) * 15


def test_each_format_is_scored_and_its_dependencies_measured_among_its_own_layers():
    from worker.engine.adapters import TEXT_GENERATION, adapt
    from worker.engine.data import synthetic
    from worker.engine.evaluation import Evaluator
    from worker.engine.sensitivity import SensitivityOptions, analyse

    adapter = adapt(_tiny_llama(), TEXT_GENERATION)
    data = synthetic(TEXT_GENERATION, DataOptions(calibration_samples=16, eval_samples=8, test_samples=8, seq_len=16,
                                                  batch_size=8), vocab_size=128)
    evaluator = Evaluator(adapter, data, TEXT_GENERATION)
    calibration = evaluator.batches("calibration")
    backend = choose_backend(adapter, "cpu", calibration[0], formats=INTEGER_FORMATS)
    result = analyse(backend.simulation(calibration), evaluator, backend.candidates,
                     SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1, interlayer_batches=2), adapter)
    rows = {row.name: row for row in result.layers}
    assert len(rows) == 45 and all(row.interlayer is not None for row in rows.values())
    # Leave-one-out within each format: the subsets measured are the whole group and each layer left out.
    assert result.method["loss_evaluations"] == 3 * (15 + 1)
    head = [rows[f"model.lm_head@{precision}"] for precision in INTEGER_FORMATS]
    assert len({row.hessian_trace for row in head}) == 1  # one layer output, one trace
    assert head[2].output_error > head[1].output_error  # 4-bit weights err more than 8-bit ones
    assert sorted(result.ordering) == sorted(backend.candidates)


def test_generation_latency_is_refused_for_other_models(cache_dir):
    from worker.engine import compress
    from worker.engine.errors import InputError

    with pytest.raises(InputError, match="for causal language models"):
        compress("builtin:digits-resnet", _options(cache_dir, generation_latency="prefill"))


def test_gemma3_builtin_is_the_real_model_from_its_checked_parts(cache_dir):
    """Gemma 3 270M joined from its four part packages (checked against their published SHA-256) predicts news
    text far better than chance: real weights, read by transformers' GGUF reader, tokenizer beside them."""
    from worker.engine.builtins import load_builtin

    builtin = load_builtin("gemma3-270m", DataOptions(calibration_samples=8, eval_samples=8, test_samples=8,
                                                      seq_len=32, batch_size=8), cache_dir)
    model, data = builtin.model, builtin.default_data()
    assert model.config.model_type.startswith("gemma3") and model.config.vocab_size == 262144
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 18 * 7 + 1  # 18 blocks of q/k/v/o and gate/up/down, and the tied vocabulary head
    ids = data.evaluation[0]["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert math.exp(nll) < 200  # a uniform guess over the vocabulary is 262,144


def test_a_model_joined_from_parts_that_do_not_match_its_checksum_is_refused(tmp_path):
    from worker.engine.builtins import _join_checked
    from worker.engine.errors import InputError

    parts = [tmp_path / "a", tmp_path / "b"]
    for part, content in zip(parts, (b"one", b"two")):
        part.write_bytes(content)
    import hashlib

    (tmp_path / "sums").write_text(f"{hashlib.sha256(b'onetwo').hexdigest()}  model.gguf\n")
    _join_checked(parts, tmp_path / "model.gguf", tmp_path / "sums")
    assert (tmp_path / "model.gguf").read_bytes() == b"onetwo"
    (tmp_path / "sums").write_text(f"{hashlib.sha256(b'other').hexdigest()}  other.gguf\n")
    with pytest.raises(InputError, match="does not match"):
        _join_checked(parts, tmp_path / "other.gguf", tmp_path / "sums")
    assert not (tmp_path / "other.gguf").exists() and len(list(tmp_path.iterdir())) == 4
