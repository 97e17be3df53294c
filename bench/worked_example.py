"""The README's worked example: MiniLM at a 0.5% budget through the real CLI, its output kept as it printed
(bench/results/worked-example.txt) and its report with the provenance every result carries
(worked-example.json).

    .venv/bin/python bench/worked_example.py
"""

from __future__ import annotations

import json
import subprocess

from common import ROOT, RESULTS, provenance

COMMAND = ["compress", "builtin:minilm", "--budget", "0.005", "--export", "onnx", "--out", "var/runs/minilm"]


def main() -> None:
    printed = subprocess.run([str(ROOT / ".venv" / "bin" / "mixq"), *COMMAND], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    (RESULTS / "worked-example.txt").write_text(f"$ .venv/bin/mixq {' '.join(COMMAND)}\n{printed}")
    report = json.loads((ROOT / "var" / "runs" / "minilm" / "report.json").read_text())
    (RESULTS / "worked-example.json").write_text(json.dumps({"provenance": provenance(), "results": report},
                                                            indent=2))
    print(printed)


if __name__ == "__main__":
    main()
