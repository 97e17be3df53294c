"""The `mixq` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .logs import quiet_library_noise
from .settings import get_settings


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Fastest mixed-precision model within an accuracy budget")
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("compress", help="compress one model and write report.json and the artifact")
    c.add_argument("source", help="hf:<repo_id>[@revision], local:<dir under MIXQ_MODEL_ROOT> or builtin:<name>")
    c.add_argument("--budget", type=_number, required=True,
                   help="largest allowed metric drop, in (0, 1): 0.01 = 1%% of the baseline (relative)")
    c.add_argument("--min-drop", type=_number, default=0.0,
                   help="lower edge of the degradation range: stop searching once a drop lands in [min, budget]")
    c.add_argument("--absolute", action="store_true", help="budget in absolute metric points, not relative")
    c.add_argument("--ordering", choices=["augmented", "hessian", "random"], default="augmented")
    c.add_argument("--interlayer", choices=["conditional", "pairwise"], default="conditional",
                   help="which measured inter-layer dependency term augments the Hessian")
    c.add_argument("--interlayer-weight", type=_number, default=0.5,
                   help="share of the dependency term in the combined score, in [0, 1]")
    c.add_argument("--hutchinson-samples", type=_positive_int, default=16, help="cap on Hutchinson samples (at least 2)")
    c.add_argument("--hutchinson-tol", type=_number, default=0.1, help="stop when stderr <= tol * |trace|")
    c.add_argument("--data", help="HF dataset ID (hf:name[@config]) or a file/folder under MIXQ_MODEL_ROOT")
    c.add_argument("--split", default="train", help="dataset split (HF datasets)")
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--image-column", default="image")
    c.add_argument("--synthetic-data", action="store_true", help="random inputs (latency work only)")
    c.add_argument("--calibration-samples", type=_positive_int, default=128)
    c.add_argument("--eval-samples", type=_positive_int, default=256)
    c.add_argument("--test-samples", type=_positive_int, default=256,
                   help="held out from every decision; scores the final plan once")
    c.add_argument("--batch-size", type=_positive_int, default=8)
    c.add_argument("--seq-len", type=_positive_int, default=128)
    c.add_argument("--latency-repeats", type=_positive_int, default=15)
    c.add_argument("--device", default=None, help="cpu (default) or cuda")
    c.add_argument("--threads", type=_positive_int, default=None)
    c.add_argument("--out", type=Path, default=None, help="folder for report.json and artifact/")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")

    s = commands.add_parser("serve", help="API + dashboard + one worker in one command (embedded default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")

    w = commands.add_parser("worker", help="a Celery worker for compression jobs")
    w.add_argument("--concurrency", type=_positive_int, default=1)
    w.add_argument("--beat", action="store_true", help="also run the scheduler in this process")
    commands.add_parser("beat", help="the Celery beat scheduler (stale-job requeue)")

    db = commands.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade"])

    k = commands.add_parser("keys", help="API keys")
    k.add_argument("action", choices=["create"])
    k.add_argument("--tenant", required=True, help="tenant the key acts for (created if new)")

    sub = commands.add_parser("submit", help="submit a job to a running server")
    sub.add_argument("source")
    sub.add_argument("--budget", type=_number, required=True)
    sub.add_argument("--min-drop", type=_number, default=0.0)
    sub.add_argument("--absolute", action="store_true")
    sub.add_argument("--ordering", choices=["augmented", "hessian", "random"], default="augmented")
    sub.add_argument("--wait", action="store_true", help="show progress until the job ends")
    for name in ("status", "wait"):
        p = commands.add_parser(name, help=f"{name} of a job on a running server")
        p.add_argument("job_id")
    return parser


def _options(args):
    from worker.engine import CompressOptions, DataOptions, LatencyOptions, SensitivityOptions, Budget

    settings = get_settings()
    return CompressOptions(
        budget=Budget(max_drop=args.budget, min_drop=args.min_drop, mode="absolute" if args.absolute else "relative"),
        sensitivity=SensitivityOptions(ordering=args.ordering, interlayer=args.interlayer,
                                       interlayer_weight=args.interlayer_weight,
                                       hutchinson_max_samples=max(2, args.hutchinson_samples),
                                       hutchinson_min_samples=min(4, max(2, args.hutchinson_samples)),
                                       hutchinson_tol=args.hutchinson_tol),
        data=DataOptions(spec=args.data, split=args.split, text_column=args.text_column,
                         label_column=args.label_column or None, image_column=args.image_column,
                         synthetic=args.synthetic_data, calibration_samples=args.calibration_samples,
                         eval_samples=args.eval_samples, test_samples=args.test_samples, batch_size=args.batch_size,
                         seq_len=args.seq_len),
        latency=LatencyOptions(repeats=args.latency_repeats),
        device=args.device or settings.device,
        threads=args.threads or settings.threads,
        model_root=settings.model_root,
        cache_dir=settings.cache_dir,
        out_dir=args.out,
    )


class ProgressPrinter:
    """On a terminal, one updating line per phase; elsewhere (logs), phase boundaries and search steps."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.phase = None

    def __call__(self, event) -> None:
        bar = "#" * int(event.fraction * 20)
        line = f"[{bar:<20}] {event.fraction * 100:5.1f}%  {event.phase}: {event.message}"
        if self.tty:
            if self.phase not in (None, event.phase):
                self.stream.write("\n")
            self.stream.write("\r\033[K" + line)
        elif event.step is not None or event.message.startswith(f"{event.phase} "):
            self.stream.write(line + "\n")
        self.phase = event.phase
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self.phase:
            self.stream.write("\n")


def compress(args) -> int:
    from worker.engine import InputError, compress as run, render

    try:
        options = _options(args)
        printer = ProgressPrinter()
        report = run(args.source, options, progress=printer)
    except (InputError, ValueError) as exc:
        print(f"\nmixq: error: {exc}", file=sys.stderr)
        return 2
    printer.finish()
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    if args.out:
        print(f"\nwrote {args.out / 'report.json'} and {args.out / 'artifact'}/", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    args = build_parser().parse_args(argv)
    from . import service_cli

    handlers = {"compress": compress, "serve": service_cli.serve, "worker": service_cli.worker,
                "beat": service_cli.beat, "db": service_cli.db, "keys": service_cli.keys,
                "submit": service_cli.submit, "status": service_cli.status, "wait": service_cli.wait}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
