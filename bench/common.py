"""What the benchmarks share: running as a `mixq` engine process, their command line, the data they use,
the plans they score, and their results (each file records the commit and report format it ran on)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Real ImageNet photographs beside the checkout (../shared/data, see its README); never copied into the repo.
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-sample-1k"
sys.path.insert(0, str(ROOT))


# `--smoke`: the script's own code at HEAD on tiny sizes, in seconds, so that no benchmark can stop running
# unnoticed (`make test` runs each so: tests/test_bench.py). Its figures mean nothing; they go to --out.
SMOKE = "--smoke" in sys.argv
# The benchmarks that compare int8 methods (orderings, peers, the simulation, acceptance) name int8 alone: on a
# CPU whose measured menu adds bf16 per layer, the default would change what they compare.
INT8 = ("int8",)
SMOKE_CAPS = {"calibration_samples": 8, "eval_samples": 16, "test_samples": 16, "seq_len": 16,  # DataOptions
              "repeats": 3, "warmup": 1, "profile_seconds": 0.005,  # LatencyOptions
              "hutchinson_max_samples": 2, "hutchinson_min_samples": 2, "hessian_batches": 1,  # SensitivityOptions
              "interlayer_batches": 1}


def engine_process() -> None:
    """Set this process up as `mixq compress` is: the allocator setting (re-executing if need be), quiet
    libraries, and two threads as on the machine the figures are for."""
    from worker.engine import allocator

    allocator.reexec(sys.argv)
    from app.core.logs import quiet_library_noise

    quiet_library_noise()
    import torch

    torch.set_num_threads(2)
    if SMOKE:
        _cap_sizes()


def _cap_sizes() -> None:
    """Every DataOptions, LatencyOptions and SensitivityOptions a script makes, capped at SMOKE_CAPS."""
    from worker.engine import DataOptions, LatencyOptions, SensitivityOptions

    for options in (DataOptions, LatencyOptions, SensitivityOptions):
        made = options.__init__

        def capped(self, *args, made=made, **kwargs):
            made(self, *args, **kwargs)
            for name, cap in SMOKE_CAPS.items():
                if isinstance(getattr(self, name, None), (int, float)) and not isinstance(getattr(self, name), bool):
                    setattr(self, name, min(getattr(self, name), cap))
        options.__init__ = capped


def parser(doc: str, models: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models, help="comma-separated builtin names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--imagenet", type=Path, default=IMAGENET,
                        help="an ImageNet-layout folder (a folder per WordNet id) for the EfficientNet builtins")
    parser.add_argument("--keep", action="store_true",
                        help="keep the committed results of the models not re-run (each model's run is self-contained)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds: checks that the script runs at HEAD (its figures mean nothing; "
                             "give --out a scratch folder)")
    return parser


def budgets(text: str) -> tuple[float, ...]:
    """A --budgets argument: comma-separated budgets as fractions ("0.005,0.01")."""
    return tuple(float(budget) for budget in text.split(","))


def data_for(model: str, imagenet: Path, **sizes):
    """The benchmark data of a builtin: an ImageNet folder (top-1 accuracy) for the EfficientNets, the builtin's
    own otherwise. Returns (DataOptions, model_root)."""
    from worker.engine.data import DataOptions

    if model.startswith("efficientnet"):
        return DataOptions(spec=imagenet.name, **sizes), imagenet.parent
    return DataOptions(**sizes), None


def git(*args: str, root: Path = ROOT) -> str:
    """A git command's output in the checkout at `root` (this one by default)."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()


# The code a run measures is the tree it started on: taken when the script starts, not when it saves (a
# commit made during an hour-long run is not the code that ran).
STARTED_ON = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "worker", "app"))}


def provenance() -> dict:
    """The code and machine a result came from: commit (and whether the tree had uncommitted changes) when the
    run started, report format, and the hardware (CPU model and instruction sets, or GPU) every figure was
    measured on."""
    from worker.engine.hardware import detect
    from worker.engine.report import REPORT_FORMAT

    return {**STARTED_ON, "report_format": REPORT_FORMAT, "command": " ".join(["python", *sys.argv]),
            "hardware": detect(device()).to_dict()}


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hardware_line(recorded: dict | None = None) -> str:
    """The line every results table starts with: which machine measured it (this one, or the one a result's
    `provenance()` recorded)."""
    from worker.engine.hardware import detect

    description = recorded["hardware"]["description"] if recorded else detect(device()).describe()
    return f"Measured on {description}."


def by_machine(results: list[dict], markdown) -> str:
    """`markdown(results)` once per machine the results were measured on, each table under that machine's
    hardware line: with --keep, results from another machine are never tabled as if this one measured them.
    A result carries its provenance (kept ones always do, see `kept`); one without was measured by this run."""
    here = hardware_line()
    lines = [hardware_line(r["provenance"]) if "provenance" in r else here for r in results]
    return "\n".join(f"{line}\n\n{markdown([r for r, own in zip(results, lines) if own == line])}"
                     for line in dict.fromkeys(lines))


def save(out: Path, name: str, results, table: str, hardware_named: bool = False) -> None:
    """`<name>.json` (everything, with its provenance) and `<name>.md` (the table the README quotes), headed by
    this machine's hardware line unless the table names the hardware of each part itself (`hardware_named`)."""
    if SMOKE and Path(out).resolve() == RESULTS.resolve():
        raise SystemExit("a --smoke run's figures mean nothing: give it --out a scratch folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"provenance": provenance(), "results": results}, indent=2,
                                                 default=str))
    if not hardware_named:
        table = f"{hardware_line()}\n\n{table}"
    (out / f"{name}.md").write_text(table)
    print(table, flush=True)


def save_by_machine(out: Path, name: str, results: list[dict], markdown) -> None:
    """`save` for results that may come from several machines (--keep): tabled apart, under each one's hardware."""
    save(out, name, results, by_machine(results, markdown), hardware_named=True)


def kept(args, name: str, model_of) -> list:
    """With --keep, the committed results of the models this run does not re-run, each with the provenance it was
    measured with (its own, or its file's for results written before they carried one); `model_of(result)` names
    a result's model."""
    path = args.out / f"{name}.json"
    if not args.keep or not path.exists():
        return []
    models = set(args.models.split(","))
    committed = json.loads(path.read_text())
    results = [result for result in committed["results"] if model_of(result) not in models]
    for result in results:
        result.setdefault("provenance", committed["provenance"])
    return results


def reduction_cell(reduction: dict | None, median: float | None = None) -> str:
    """A latency reduction with its 95% interval (a report's `latency.reduction`), or the bare median."""
    if reduction:
        return f"{reduction['median']:.1%} [{reduction['low']:.1%}, {reduction['high']:.1%}]"
    return "–" if median is None else f"{median:.1%}"


def cost_cell(spent: dict) -> str:
    """Samples through forward (incl. timed), simulated and backward passes: what a run spent."""
    return (f"{spent['forward'] + spent['timed']:,} / {spent['simulated']:,} / {spent['backward']:,}")


class PlanScores:
    """Every plan a benchmark scores: built on the real kernels and scored per sample on the evaluation split
    once, with what that cost (one cost-ledger phase per plan); each method is charged for the plans it
    needed, as if it had evaluated them itself."""

    def __init__(self, bench):
        from worker.engine.cost import Ledger, Spent

        self.bench, self.ledger = bench, Ledger()
        empty = frozenset()
        self.scores: dict[frozenset, list[float]] = {empty: bench.evaluator.baseline_scores()}
        self.spent: dict[frozenset, Spent] = {empty: Spent()}
        self.last: tuple[frozenset, object] | None = None  # the model built last, for timing it

    def __call__(self, low, tally: set | None = None) -> list[float]:
        key = frozenset(low)
        if key not in self.scores:
            with self.ledger.phase(str(sorted(key))) as spent:
                self.scores[key] = self.bench.evaluator.scores(self.model(low))
            self.spent[key] = spent
        if tally is not None:
            tally.add(key)
        return self.scores[key]

    def model(self, low):
        key = frozenset(low)
        if not key:
            return self.bench.backend.baseline
        if self.last is None or self.last[0] != key:
            self.last = key, self.bench.build(self.bench.plan(list(low)))
        return self.last[1]

    def charge(self, tally: set):
        """What the plans in `tally` cost, summed."""
        from worker.engine.cost import Spent

        total = Spent()
        for key in tally:
            total.add(self.spent[key])
        return total
