"""GPU path check: one builtin job on CUDA, figures printed. Run on a lent GPU machine:

    .venv/bin/python bench/gpu_check.py [builtin:minilm] [--budget 0.01]

Baseline fp16; low precision torchao int8 (fp8 on sm89+); the sensitivity analysis simulates those
kernels (per-token int8 / per-tensor fp8 activations). CI has no GPU, so this is the only check of the
CUDA path. It prints the report (warnings, evaluation and test metrics, attention kernel) and its timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.logs import quiet_library_noise  # noqa: E402

quiet_library_noise()

import torch  # noqa: E402

from worker.engine import (Budget, CompressOptions, DataOptions, LatencyOptions, SensitivityOptions,  # noqa: E402
                           compress, render)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", nargs="?", default="builtin:minilm")
    parser.add_argument("--budget", type=float, default=0.01)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    print(f"device: {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}")
    started = time.perf_counter()
    report = compress(args.source, CompressOptions(
        budget=Budget(args.budget), device="cuda",
        sensitivity=SensitivityOptions(hutchinson_max_samples=8),
        data=DataOptions(batch_size=32, seq_len=128),
        latency=LatencyOptions(warmup=10, repeats=50),
        cache_dir=ROOT / "var" / "cache", out_dir=ROOT / "var" / "gpu-check",
    ))
    print(render(report))
    summary = {k: report.to_dict()[k] for k in ("status", "warnings", "latency_reduction", "baseline", "final",
                                                "phases", "environment")}
    print(json.dumps({**summary, "wall_seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
