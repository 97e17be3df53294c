"""The README's worked example: MiniLM at a 0.5% budget through the real CLI, its output kept as it printed
(bench/results/worked-example.txt) and its report with the provenance every result carries
(worked-example.json).

    .venv/bin/python bench/worked_example.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, SMOKE, provenance

COMMAND = ["compress", "builtin:minilm", "--budget", "0.005", "--export", "onnx", "--out", "var/runs/minilm"]
SMOKE_SIZES = ["--calibration-samples", "8", "--eval-samples", "16", "--test-samples", "16", "--seq-len", "16",
               "--hutchinson-samples", "2", "--latency-repeats", "3"]


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__)
    arguments.add_argument("--out", type=Path, default=RESULTS)
    arguments.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs at HEAD")
    args = arguments.parse_args()
    if SMOKE and args.out.resolve() == RESULTS.resolve():
        sys.exit("a --smoke run's figures mean nothing: give it --out a scratch folder")
    runs = args.out / "runs" if SMOKE else ROOT / "var" / "runs"
    command = [*COMMAND[:-1], str(runs / "minilm"), *(SMOKE_SIZES if SMOKE else [])]
    printed = subprocess.run([str(ROOT / ".venv" / "bin" / "mixq"), *command], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    args.out.mkdir(parents=True, exist_ok=True)
    shown = command if SMOKE else COMMAND  # the README shows the command with its relative --out
    (args.out / "worked-example.txt").write_text(f"$ .venv/bin/mixq {' '.join(shown)}\n{printed}")
    report = json.loads((runs / "minilm" / "report.json").read_text())
    (args.out / "worked-example.json").write_text(json.dumps({"provenance": provenance(), "results": report},
                                                             indent=2))
    print(printed)


if __name__ == "__main__":
    main()
