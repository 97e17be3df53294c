"""What the benchmarks share: running as a `mixq` engine process, their command line, and their results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def engine_process() -> None:
    """Set this process up as `mixq compress` is: the allocator setting (re-executing if need be), quiet
    libraries, and two threads as on the machine the figures are for."""
    from worker.engine import allocator

    allocator.reexec(sys.argv)
    from app.core.logs import quiet_library_noise

    quiet_library_noise()
    import torch

    torch.set_num_threads(2)


def parser(doc: str, models: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models, help="comma-separated builtin names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def save(out: Path, name: str, results, table: str) -> None:
    """`<name>.json` (everything) and `<name>.md` (the table the README quotes), then the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (out / f"{name}.md").write_text(table)
    print(table, flush=True)
