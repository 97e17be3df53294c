"""Full-size models at a 1% budget: each builtin compressed by the real CLI in its own process, so its peak
memory is its own. Writes bench/results/full_size.{json,md}.

    .venv/bin/python bench/full_size.py [--models efficientnet-lite0,resnet50,mobilenetv2,bert-base]
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from common import ROOT, SMOKE, cost_cell, kept, parser, reduction_cell, save_by_machine

ARGS = ["--budget", "0.01", "--hutchinson-samples", "4", "--calibration-samples", "32", "--eval-samples", "128",
        "--test-samples", "128", "--latency-repeats", "7", "--json"]
if SMOKE:  # the CLI in its own process: the sizes go on its command line
    ARGS = ["--budget", "0.01", "--hutchinson-samples", "2", "--calibration-samples", "8", "--eval-samples", "16",
            "--test-samples", "16", "--latency-repeats", "3", "--seq-len", "16", "--json"]


def run(model: str, extra: tuple[str, ...] = ()) -> dict:
    """`mixq compress builtin:<model>` with ARGS (and `extra`) in its own process: its report, wall time and
    peak memory."""
    command = ["compress", f"builtin:{model}", *ARGS, *extra]
    started = time.perf_counter()
    process = subprocess.Popen([str(ROOT / ".venv" / "bin" / "mixq"), *command],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{model}: mixq compress failed with status {status}")
    report = json.loads(out)
    report["bench"] = {"wall_seconds": round(time.perf_counter() - started, 1),
                       "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 2), "command": ["mixq", *command]}
    return report


def _returned(report: dict) -> str:
    """What the job returned: a plan, the baseline, or the whole model cast to a 16-bit float."""
    if report["status"] == "float_cast":
        return f"{report['plan']['baseline_precision']} cast"
    return "plan" if report["status"] == "compressed" else f"baseline: {report['status']}"


def _against_cast(report: dict) -> str:
    """The returned plan's reduction against the whole model cast to bf16, where the worker's menu has it."""
    if report["status"] == "float_cast":
        return "is the cast"
    return reduction_cell(report["latency"].get("against", {}).get("bf16"))


def markdown(reports: list[dict]) -> str:
    lines = ["| model (returned) | backend | metric | k / layers | evaluations | metric eval (test) | fp32 → final ms "
             "| reduction [95% interval] | vs whole bf16 cast | size MB | phases s (load, baseline, probe, profile, "
             "sensitivity, search, final) | samples: forward / simulated / backward | wall s | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        phases = ", ".join(f"{r['phases'][p]:.0f}" for p in ("load", "baseline", "probe", "profile", "sensitivity",
                                                              "search", "final"))
        layers = len({layer["name"].split("@")[0] for layer in r["layers"]})  # candidates may be layer@format
        lines.append(
            f"| {r['source'].removeprefix('builtin:')} ({_returned(r)}) | {r['backend']['name']} "
            f"| {r['metric']['name']} | {r['final']['k']} / {layers} | {r['search']['evaluations']} "
            f"| {r['final']['metric']:.4f} ({r['final']['test_metric']:.4f}) "
            f"| {r['baseline']['latency_ms']['median']:.1f} → {r['final']['latency_ms']['median']:.1f} "
            f"| {reduction_cell(r['latency']['reduction'], r['latency_reduction'])} "
            f"| {_against_cast(r)} "
            f"| {r['baseline']['size_bytes'] / 1e6:.0f} → {r['final']['size_bytes'] / 1e6:.0f} "
            f"| {phases} | {cost_cell(r['cost']['total'])} | {r['bench']['wall_seconds']:.0f} "
            f"| {r['bench']['peak_rss_gb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser(__doc__, "efficientnet-lite0,resnet50,mobilenetv2,bert-base").parse_args()
    reports = kept(args, "full_size", lambda report: report["source"].removeprefix("builtin:"))
    for model in args.models.split(","):
        print(f"{model}...", flush=True)
        reports.append(run(model))
        save_by_machine(args.out, "full_size", reports, markdown)


if __name__ == "__main__":
    main()
