"""Torch and onnxruntime side by side: each builtin compressed at a 1% budget by the real CLI with
`--export onnx`, so the same plan is measured in both runtimes, with the same batch, on the same machine.
Writes bench/results/onnx.{json,md}.

    .venv/bin/python bench/exports.py [--models minilm,digits-resnet,digits-mobilenetv2,efficientnet-lite0]
"""

from __future__ import annotations

from common import ROOT, kept, parser, reduction_cell, save_by_machine
from full_size import run


def markdown(reports: list[dict]) -> str:
    lines = ["| model | metric | int8 layers | torch: metric eval (test) | torch: fp32 → int8 ms | torch reduction "
             "[95% interval] | onnxruntime: metric eval (test) | onnxruntime: float → int8 ms | onnxruntime reduction "
             "[95% interval] | model.onnx MB | export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        onnx, final = r["exports"].get("onnx") or {}, r["final"]
        torch_side = (f"{final['metric']:.4f} ({final['test_metric']:.4f}) "
                      f"| {r['baseline']['latency_ms']['median']:.1f} → {final['latency_ms']['median']:.1f} "
                      f"| {reduction_cell(r['latency']['reduction'], r['latency_reduction'])}")
        if onnx.get("file"):
            runtime_side = (f"{onnx['metric']:.4f} ({onnx['test_metric']:.4f}) "
                            f"| {onnx['latency_ms']['float']:.1f} → {onnx['latency_ms']['quantized']:.1f} "
                            f"| {reduction_cell(onnx['latency_interval'])} | {onnx['size_bytes'] / 1e6:.1f} "
                            f"| {onnx['export_seconds']:.0f}")
        else:
            runtime_side = f"{onnx.get('error') or onnx.get('skipped') or r['status']} | | | |"
        lines.append(f"| {r['source'].removeprefix('builtin:')} | {r['metric']['name']} "
                     f"| {final['k']} / {len(r['layers'])} | {torch_side} | {runtime_side} |")
    lines.append("")
    lines += [f"- {r['source']}: {warning}" for r in reports for warning in r["warnings"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser(__doc__, "minilm,digits-resnet,digits-mobilenetv2,efficientnet-lite0").parse_args()
    reports = kept(args, "onnx", lambda report: report["source"].removeprefix("builtin:"))
    for model in args.models.split(","):
        print(f"{model}...", flush=True)
        reports.append(run(model, ("--export", "onnx", "--out", str(ROOT / "var" / "runs" / f"onnx-{model}"))))
        save_by_machine(args.out, "onnx", reports, markdown)


if __name__ == "__main__":
    main()
