"""`report.json`: the contract other tools (service, dashboard, scripts) read, and its terminal rendering."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FORMAT = "mixq.report/1"

STATUS_MESSAGES = {
    "compressed": "mixed-precision plan within budget and faster than the baseline",
    "no_speedup": "plans within budget were measured, none beat the baseline: the baseline is returned",
    "none_fit": "even one low-precision layer exceeds the budget: the baseline is returned",
}


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def read_report(path: Path) -> dict:
    report = json.loads(Path(path).read_text())
    if report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path} is not a mixq report")
    return report


def _ms(latency: dict) -> str:
    return f"{latency['median']:.2f} ms (p90 {latency['p90']:.2f})"


def render(report: dict) -> str:
    """Plain-text summary for the CLI."""
    base, final, search = report["baseline"], report["final"], report["search"]
    metric = report["metric"]["name"]
    lines = [
        f"mixq: {report['source']} ({report['revision']}) - {report['status']}: {report['message']}",
        "",
        f"{'':12}{metric:>18}{'latency / batch':>28}{'size':>12}",
        f"{'baseline':12}{base['metric']:>18.4f}{_ms(base['latency_ms']):>28}{base['size_bytes'] / 1e6:>10.2f}MB",
        f"{'final':12}{final['metric']:>18.4f}{_ms(final['latency_ms']):>28}{final['size_bytes'] / 1e6:>10.2f}MB",
        "",
        f"latency reduction {report['latency_reduction'] * 100:.1f}%, drop {final['drop']:.4f} "
        f"(budget {report['budget']['max_drop']}{' relative' if report['budget']['relative'] else ' absolute'}), "
        f"{final['k']}/{len(report['layers'])} layers low precision",
        "",
        f"search ({search['ordering']}): {search['evaluations']} evaluations (max {search['max_evaluations']})",
        f"{'k':>5}{metric:>18}{'drop':>10}{'latency ms':>12}  accepted",
    ]
    for step in search["steps"]:
        latency = "-" if step["latency_ms"] is None else f"{step['latency_ms']:.2f}"
        chosen = "  <- chosen" if step.get("chosen") else ""
        lines.append(f"{step['k']:>5}{step['metric']:>18.4f}{step['drop']:>10.4f}{latency:>12}  "
                     f"{'yes' if step['accepted'] else 'no'}{chosen}")
    lines.append("")
    lines.append("phases: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in report["phases"].items()))
    return "\n".join(lines)
