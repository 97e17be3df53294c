"""Which int8 Linear path keeps a transformer accurate and fast on this CPU? all-MiniLM-L6-v2 with every Linear
in int8, each path's cosine fidelity on the evaluation split and its latency against its own fp32 model in paired
rounds (batch 8 x 128, two threads). Then SmoothQuant-style smoothing where it folds into the model.

Paths: torch's dynamic Linear on the x86 engine (fbgemm) and on oneDNN, each with the 7-bit activations the
module hard-codes and with 8 bits (forced here, whatever the engine's own check of this CPU says: without VNNI
8-bit products saturate); torchao's int8 dynamic-activation config, compiled (against compiled fp32);
onnxruntime's own dynamic quantization (against its float file); and the whole model cast to bf16 and fp16,
the float executions a mixed plan must also beat. Writes bench/results/kernels.{json,md}, whose first line
names the machine.

    .venv/bin/python bench/linear_kernels.py   (not kernels.py: that name would shadow the `kernels` package transformers imports)
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from common import INT8, ROOT, SMOKE, engine_process, parser, reduction_cell, save

engine_process()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # noqa: E402

from worker.engine import export  # noqa: E402
from worker.engine.kernels import capture_inputs  # noqa: E402
from worker.engine.kernels import WholeCast  # noqa: E402
from worker.engine.latency import paired  # noqa: E402
from worker.engine.pipeline import CompressOptions, prepare  # noqa: E402
from worker.engine.search import Budget  # noqa: E402

ROUNDS = 3 if SMOKE else 15
ALPHAS = (0.25, 0.5, 0.75)


def measure(bench, label: str, model, baseline, setup_seconds: float = 0.0, note: str = "") -> dict:
    example = bench.example
    timing = paired(lambda: baseline(*example), lambda: model(*example), rounds=ROUNDS, inner=1)
    row = {"path": label, "cosine": bench.evaluator.metric(model), "fp32_ms": timing.first_ms,
           "int8_ms": timing.second_ms, "reduction": timing.reduction().to_dict(),
           "setup_seconds": round(setup_seconds, 1), "note": note}
    print(row, flush=True)
    return row


class EightBitLinear(torch.ao.nn.quantized.dynamic.Linear):
    """The dynamic Linear asked for 8-bit activations on any CPU (mixq's own module asks only where exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                  reduce_range=False).to(x.dtype)


def dynamic(bench, engine: str, eight_bits: bool):
    torch.backends.quantized.engine = engine
    mapping = {nn.Linear: EightBitLinear} if eight_bits else None
    model = quantize_dynamic(copy.deepcopy(bench.adapter).eval(), {n: per_channel_dynamic_qconfig
                                                                    for n in bench.candidates},
                             dtype=torch.qint8, mapping=mapping)
    # quantize_dynamic skips names it does not find without a word: a row of unquantized layers would read as
    # an int8 path with no error and no speed-up.
    quantized = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == len(bench.candidates), f"{len(quantized)} of {len(bench.candidates)} layers in int8"
    return model


def smoothed(bench, alpha: float) -> nn.Module:
    """The float model with SmoothQuant's scales folded where BERT allows it without a runtime cost: each
    attention output projection's input channels, absorbed by the value projection's output rows (softmax
    weights mix rows of V linearly). The LayerNorm outputs feeding Q/K/V and the FFN also carry the residual
    stream, and the FFN output follows GELU: no scale folds there."""
    model = copy.deepcopy(bench.adapter)
    modules = dict(model.named_modules())
    outputs = [n for n in bench.candidates if n.endswith("attention.output.dense")]
    inputs = {n: torch.cat([x[0].flatten(0, -2) for x in [capture_inputs(bench.adapter, [n], batch)[n]
                                                            for batch in bench.calibration]]) for n in outputs}
    with torch.no_grad():
        for name in outputs:
            dense, value = modules[name], modules[name.replace("output.dense", "self.value")]
            scale = (inputs[name].abs().amax(0).clamp(min=1e-5) ** alpha
                     / dense.weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha))
            value.weight.div_(scale[:, None])
            value.bias.div_(scale)
            dense.weight.mul_(scale[None, :])
    return model


def run(cache_dir: Path) -> list[dict]:
    # int8 named: the candidates are MiniLM's 36 Linear layers on every CPU (a menu with bf16 would make them
    # layer@format items, which no quantizer below knows).
    bench = prepare("builtin:minilm", CompressOptions(budget=Budget(0.01), cache_dir=cache_dir, formats=INT8))
    baseline, rows = bench.adapter, []
    for engine in ("x86", "onednn"):
        for eight_bits in (False, True):
            label = f"torch dynamic Linear, {engine} engine, {'8' if eight_bits else '7'}-bit activations"
            rows.append(measure(bench, label, dynamic(bench, engine, eight_bits), baseline))
    for precision in ("bf16", "fp16"):
        rows.append(measure(bench, f"whole model cast to {precision} (no int8)", WholeCast(bench.adapter, precision),
                            baseline, note="attention, norms and activations in 16 bits too"))
    torch.backends.quantized.engine = "onednn"
    for alpha in ALPHAS:
        original, bench.adapter = bench.adapter, smoothed(bench, alpha)
        rows.append(measure(bench, f"oneDNN 8-bit, attention output projections smoothed (alpha {alpha})",
                            dynamic(bench, "onednn", True), baseline,
                            note="scales folded into the value projections"))
        bench.adapter = original
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    started = time.perf_counter()
    quantized = copy.deepcopy(bench.adapter)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in set(bench.candidates))
    compiled, compiled_fp32 = torch.compile(quantized), torch.compile(bench.adapter)
    with torch.inference_mode():
        compiled(*bench.example)
        compiled_fp32(*bench.example)
    rows.append(measure(bench, "torchao int8 dynamic activations, torch.compile", compiled, compiled_fp32,
                        time.perf_counter() - started, "against compiled fp32; setup = quantize and compile"))
    with tempfile.TemporaryDirectory() as folder:
        float_path = Path(folder) / "float.onnx"
        names = list(bench.adapter.input_names)
        export.export_float(bench.adapter, names, bench.example, float_path)
        plan = bench.plan(bench.candidates)
        started = time.perf_counter()
        export.quantize(float_path, Path(folder) / "int8.onnx", plan, __import__("onnx").load(str(float_path)).graph,
                        names, bench.calibration, "dynamic")
        setup = time.perf_counter() - started
        float_model = export.OrtModel(float_path, names, ["CPUExecutionProvider"], torch.get_num_threads())
        int8_model = export.OrtModel(Path(folder) / "int8.onnx", names, ["CPUExecutionProvider"],
                                     torch.get_num_threads())
        rows.append(measure(bench, "onnxruntime quantize_dynamic, run in onnxruntime", int8_model, float_model,
                            setup, "against onnxruntime's float file"))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| all 36 Linear layers in int8 (or the whole model in 16 bits) | cosine fidelity (eval) | fp32 → int8 ms | latency reduction "
             "[95% interval] | setup s | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['cosine']:.4f} | {r['fp32_ms']:.1f} → {r['int8_ms']:.1f} "
                     f"| {reduction_cell(r['reduction'])} | {r['setup_seconds']:.0f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser(__doc__, "minilm").parse_args()
    rows = run(ROOT / "var" / "cache")
    save(args.out, "kernels", rows, markdown(rows))


if __name__ == "__main__":
    main()
