"""`mixq compress`: the engine in this process, from the same job request the API takes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import ValidationError

from app.core.schemas import JobCreate
from app.core.settings import get_settings
from worker.engine.search import Budget

from .arguments import add_job_arguments, job_request, number, positive_int
from .progress import ProgressPrinter

def add_commands(commands) -> None:
    c = commands.add_parser("compress", help="compress one model and write report.json and the artifact")
    add_job_arguments(c)
    c.add_argument("--interlayer-weight", type=number, default=0.5,
                   help="share of the dependency term in the combined score, in [0, 1]")
    c.add_argument("--hutchinson-tol", type=number, default=0.1, help="stop when stderr <= tol * |trace|")
    c.add_argument("--latency-repeats", type=positive_int, default=15)
    c.add_argument("--device", default=None, help="cpu (default) or cuda")
    c.add_argument("--threads", type=positive_int, default=None)
    c.add_argument("--out", type=Path, default=None, help="folder for report.json and artifact/")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    c.set_defaults(handler=run)


def _validated(args) -> dict:
    """The request, validated as the API validates it; raises ValueError with the first problem."""
    request = {"exports": [], **job_request(args)}  # in this process, ONNX only when asked
    if request["exports"] and not args.out:
        raise ValueError("--export onnx writes files: give --out DIR")
    budget = request["budget"]
    Budget(budget["max_drop"], budget["min_drop"], budget["mode"], budget["confidence"])  # its own words for its range
    try:
        return JobCreate.model_validate(request).model_dump(mode="json")
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ValueError(f"{where}: {problem['msg'].removeprefix('Value error, ')}") from None


def run(args) -> int:
    # The engine (and torch) loads only when this command runs.
    from worker.engine import InputError, compress, render
    from worker.engine.pipeline import CompressOptions

    settings = get_settings()
    printer = ProgressPrinter()
    try:
        options = CompressOptions.from_request(
            _validated(args), interlayer_weight=args.interlayer_weight, hutchinson_tol=args.hutchinson_tol,
            latency_repeats=args.latency_repeats, profile_seconds=settings.profile_seconds_per_layer,
            device=args.device or settings.device,
            threads=args.threads or settings.threads, model_root=settings.model_root, cache_dir=settings.cache_dir,
            out_dir=args.out)
        report = compress(args.source, options, progress=printer)
    except (InputError, ValueError) as exc:
        print(f"\nmixq: error: {exc}", file=sys.stderr)
        return 2
    printer.finish()
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    if args.out:
        print(f"\nwrote {args.out / 'report.json'} and {args.out / 'artifact'}/", file=sys.stderr)
    return 0
