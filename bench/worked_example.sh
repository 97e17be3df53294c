#!/usr/bin/env bash
# The README's worked example: MiniLM at a 1% budget through the real CLI, output kept as it printed.
#   bash bench/worked_example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/mixq compress builtin:minilm --budget 0.01 --export onnx --out var/runs/minilm 2>/dev/null | tee bench/results/worked-example.txt
