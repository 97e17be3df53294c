"""A real peer: OpenVINO NNCF's accuracy-controlled quantization (`nncf.quantize_with_accuracy_control`, ONNX
backend, onnxruntime) on the ONNX export of the same float model, with the same calibration and evaluation
batches, the same metric (each validation call scores the evaluation split through the job's own Evaluator)
and the same relative budget. nncf is a benchmark dependency (`pip install -e '.[bench]'`), never the
service's.

NNCF ranks every quantizer group with one validation call each before it reverts any: on a transformer that
can take longer than a benchmark run has, so a run is capped (`cap_seconds`): past it the next validation call
stops NNCF, and the result says it was capped, after how many calls, with no model.

Reported: the int8 layers of the returned file, its metric on both splits (paired standard errors as
mixq's), its onnxruntime latency against the float file's (paired rounds, the median's order-statistic
interval, as mixq's), NNCF's wall time (export excluded) and validation calls; once with NNCF's default preset and once with per-tensor
activation scales (onnxruntime runs per-channel activation scales of depthwise inputs in float).
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx

from worker.engine import export
from worker.engine.latency import paired
from worker.engine.search import Budget

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def int8_layers(model: onnx.ModelProto) -> int:
    """Weight ops whose weight comes through a DequantizeLinear (QDQ) or that are integer ops."""
    produced = {output: node for node in model.graph.node for output in node.output}
    count = 0
    for node in model.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"):
            count += 1
        elif node.op_type in WEIGHT_OPS and len(node.input) > 1:
            source = produced.get(node.input[1])
            count += source is not None and source.op_type == "DequantizeLinear"
    return count


class Capped(Exception):
    """NNCF's run passed its time cap (raised from its validation callback, which NNCF does not catch)."""


def run(bench, budget: Budget, float_path: Path, rounds: int, per_tensor: bool, transformer: bool,
        cap_seconds: float) -> dict:
    """NNCF accuracy control on `float_path` (the export of `bench`'s baseline); figures as mixq reports them,
    or, past `cap_seconds`, only that it was capped."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    names, evaluator = list(bench.adapter.input_names), bench.evaluator
    threads = __import__("torch").get_num_threads()
    providers = ["CPUExecutionProvider"]
    calls = []

    def validate(model: onnx.ModelProto, _data) -> tuple[float, list[float]]:
        if time.perf_counter() - started > cap_seconds:
            raise Capped
        calls.append(time.perf_counter())
        scores = evaluator.scores(export.OrtModel(model.SerializeToString(), names, providers, threads))
        return sum(scores) / len(scores), scores

    calibration = nncf.Dataset([export._feeds(names, batch) for batch in bench.calibration])
    validation = nncf.Dataset(list(range(len(evaluator.data.evaluation))))  # validate() reads the split itself
    advanced = AdvancedQuantizationParameters(
        activations_quantization_params=QuantizationParameters(per_channel=False)) if per_tensor else None
    preset = "per-tensor activations" if per_tensor else "default"
    started = time.perf_counter()
    try:
        quantized = nncf.quantize_with_accuracy_control(
            onnx.load(str(float_path)), calibration, validation, validate, max_drop=budget.max_drop,
            drop_type=nncf.DropType.RELATIVE, subset_size=sum(len(b[0]) for b in bench.calibration),
            model_type=nncf.ModelType.TRANSFORMER if transformer else None, advanced_quantization_parameters=advanced)
    except Capped:
        return {"capped": cap_seconds, "wall_seconds": round(time.perf_counter() - started, 1),
                "validation_calls": len(calls), "validation_samples": len(calls) * evaluator.data.sizes["evaluation"],
                "preset": preset}
    wall = time.perf_counter() - started

    serialised = quantized.SerializeToString()
    float_model = export.OrtModel(float_path, names, providers, threads)
    int8_model = export.OrtModel(serialised, names, providers, threads)
    baseline_eval, baseline_test = evaluator.scores(float_model), evaluator.scores(float_model, "test")
    eval_scores, test_scores = evaluator.scores(int8_model), evaluator.scores(int8_model, "test")
    drop, stderr = budget.paired(baseline_eval, eval_scores)
    test_drop, test_stderr = budget.paired(baseline_test, test_scores)
    example = bench.example
    timing = paired(lambda: float_model(*example), lambda: int8_model(*example), rounds=rounds, inner=1)
    reduction = timing.reduction()
    return {"int8_layers": int8_layers(quantized), "metric": sum(eval_scores) / len(eval_scores),
            "test_metric": sum(test_scores) / len(test_scores), "drop": drop, "stderr": stderr,
            "test_drop": test_drop, "test_stderr": test_stderr,
            "float_metric": sum(baseline_eval) / len(baseline_eval), "within_budget": drop <= budget.max_drop,
            "within_budget_on_test": test_drop <= budget.max_drop,
            "ort_ms": {"float": timing.first_ms, "int8": timing.second_ms}, "ort_reduction": reduction.to_dict(),
            "wall_seconds": round(wall, 1), "validation_calls": len(calls),
            "validation_samples": len(calls) * len(baseline_eval),
            "preset": preset, "size_bytes": len(serialised)}
