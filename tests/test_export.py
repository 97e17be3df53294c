"""ONNX export: every layer maps to exactly its own node, exactly the plan's layers become int8, the figures are
measured in onnxruntime, and the README's snippet runs the file."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from worker.engine import Budget, CompressOptions, DataOptions, LatencyOptions, SensitivityOptions, compress
from conftest import every_layer_saves, integer_menu
from worker.engine import export, pipeline
from worker.engine.pipeline import prepare

ROOT = Path(__file__).resolve().parents[1]
SMALL = DataOptions(calibration_samples=16, eval_samples=32, test_samples=32, seq_len=16, batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def cpu_independent_menu():
    """The same formats on every CPU (an AVX-512 bf16 or AMX CPU's menu adds bf16 per layer, which a job that
    asks for an ONNX export does not get: test_a_job_that_asks_for_onnx_keeps_formats_onnxruntime_runs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_or_measure", integer_menu)
        yield


@pytest.fixture(scope="module", params=["builtin:minilm", "builtin:digits-resnet"])
def exported(request, cache_dir, tmp_path_factory):
    bench = prepare(request.param, CompressOptions(budget=Budget(0.01), data=SMALL, cache_dir=cache_dir))
    path = tmp_path_factory.mktemp("onnx") / export.FLOAT_FILE
    export.export_float(bench.backend.baseline, list(bench.adapter.input_names), bench.example, path)
    return bench, path


def _initializers(graph) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # the exporter may also keep folded weights as Constant nodes
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def test_every_layer_maps_to_exactly_the_node_that_holds_its_weight(exported):
    bench, path = exported
    graph = onnx.load(str(path)).graph
    nodes = export.layer_nodes(graph, bench.candidates)
    assert sorted(nodes) == sorted(bench.candidates) and len(set(nodes.values())) == len(nodes)
    by_name, values = {node.name: node for node in graph.node}, _initializers(graph)
    modules = dict(bench.backend.baseline.named_modules())  # BatchNorm already folded into the convs there
    for layer, node_name in nodes.items():
        module = modules[layer] if hasattr(modules[layer], "weight") else modules[layer][0]  # a fused Conv+ReLU
        node, weight = by_name[node_name], module.weight.detach().numpy()
        stored = values[node.input[1]]
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(
            a.name == "transB" and a.i for a in node.attribute))
        assert np.array_equal(stored.T if transposed else stored, weight), layer


def _quantized_weight_nodes(graph, mode: str) -> set[str]:
    """Names of the weight nodes that run int8 in a quantized graph."""
    if mode == "dynamic":  # quantize_dynamic replaces a MatMul by MatMulInteger, keeping its name prefix
        return {n.name.removesuffix("_quant") for n in graph.node if n.op_type in ("MatMulInteger", "ConvInteger")}
    produced_by = {output: node for node in graph.node for output in node.output}
    return {n.name for n in graph.node if n.op_type in export.WEIGHT_OPS
            and produced_by.get(n.input[1]) is not None and produced_by[n.input[1]].op_type == "DequantizeLinear"}


def test_exactly_the_plans_low_layers_become_int8(exported, tmp_path):
    bench, path = exported
    low = bench.candidates[::2]
    plan = bench.plan(low)
    graph = onnx.load(str(path)).graph
    nodes = export.layer_nodes(graph, bench.candidates)
    out = tmp_path / export.QUANTIZED_FILE
    assert export.quantize(path, out, plan, graph, list(bench.adapter.input_names), bench.calibration,
                           bench.backend.onnx_quantization) == len(low)
    int8 = _quantized_weight_nodes(onnx.load(str(out)).graph, bench.backend.onnx_quantization)
    assert int8 == {nodes[name] for name in low}


def test_a_compressed_job_reports_its_onnx_figures_from_onnxruntime(cache_dir, tmp_path, monkeypatch):
    every_layer_saves(monkeypatch)  # about the export, not torch's speed-up
    options = CompressOptions(
        budget=Budget(0.01), data=SMALL, exports=("onnx",), out_dir=tmp_path, cache_dir=cache_dir,
        sensitivity=SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1, interlayer_batches=1),
        latency=LatencyOptions(warmup=2, repeats=5, profile_seconds=0.05))
    report = compress("builtin:minilm", options)
    onnx_figures = report.exports["onnx"]
    assert report.status == "compressed", report.message
    assert "onnx" in report.phases and onnx_figures["error"] is None
    assert (tmp_path / onnx_figures["file"]).is_file() and (tmp_path / onnx_figures["float_file"]).is_file()
    assert onnx_figures["int8_layers"] == report.final.k
    assert 0 < onnx_figures["metric"] <= 1 and onnx_figures["float"]["metric"] == pytest.approx(1.0, abs=1e-4)
    assert onnx_figures["latency_ms"]["float"] > 0 and onnx_figures["latency_ms"]["quantized"] > 0
    assert onnx_figures["runtime"]["providers"] == ["CPUExecutionProvider"] and onnx_figures["opset"] == export.OPSET
    over_budget = onnx_figures["drop"] > 0.01
    assert over_budget == any("in onnxruntime the plan drops" in w for w in report.warnings)
    interval = onnx_figures["latency_interval"]
    assert interval["low"] <= interval["median"] <= interval["high"]
    assert (not interval["faster"]) == any("not measurably faster than the float file" in w for w in report.warnings)
    # The batch size is free in the file: any number of sentences embeds.
    session = export.OrtModel(tmp_path / onnx_figures["file"], ["input_ids", "attention_mask"],
                              ["CPUExecutionProvider"], 1)
    ids = torch.full((3, 16), 2023)
    assert session(ids, torch.ones_like(ids)).shape == (3, 384)


def test_a_model_the_exporter_cannot_lower_says_why_and_the_job_still_succeeds(cache_dir, tmp_path, monkeypatch):
    every_layer_saves(monkeypatch)  # only a returned plan is exported
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    report = compress("builtin:minilm", CompressOptions(
        budget=Budget(0.01), data=SMALL, exports=("onnx",), out_dir=tmp_path, cache_dir=cache_dir,
        sensitivity=SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1, interlayer_batches=1),
        latency=LatencyOptions(warmup=1, repeats=3, profile_seconds=0.05)))
    assert "aten::frobnicate" in report.exports["onnx"]["error"]
    assert any(w.startswith("no ONNX export: torch.onnx.export failed") for w in report.warnings)
    assert (tmp_path / "artifact" / "model.safetensors").is_file()


def test_the_readme_snippet_runs_an_exported_model(exported, tmp_path):
    bench, path = exported
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    plan = bench.plan(bench.candidates)
    export.quantize(path, tmp_path / "model.onnx", plan, onnx.load(str(path)).graph, list(bench.adapter.input_names),
                    bench.calibration, bench.backend.onnx_quantization)
    np.savez(tmp_path / "inputs.npz", **{name: t.numpy() for name, t in zip(bench.adapter.input_names,
                                                                              bench.example)})
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with torch.inference_mode():
        expected = tuple(bench.backend.baseline(*bench.example).shape)
    assert run.stdout.strip().endswith(str(expected))


def test_a_job_that_asks_for_onnx_keeps_formats_onnxruntime_runs(cache_dir, monkeypatch):
    """On a CPU whose menu offers bf16 per layer, a job exporting ONNX still searches int8 alone: onnxruntime's
    quantizer has no bf16 Linear, and a plan with one could not be exported."""
    from conftest import bf16_menu

    monkeypatch.setattr(pipeline, "load_or_measure", bf16_menu)
    plain = prepare("builtin:minilm", CompressOptions(budget=Budget(0.01), data=SMALL, cache_dir=cache_dir))
    onnx_job = prepare("builtin:minilm", CompressOptions(budget=Budget(0.01), data=SMALL, cache_dir=cache_dir,
                                                         exports=("onnx",)))
    assert "bf16" in plain.backend.formats
    assert onnx_job.backend.formats == ("int8",) and all("@" not in name for name in onnx_job.candidates)
