"""The committed benchmark results are the shipped code's: each records the commit and report format it ran
on, none predates the engine's report format, and the README's and method.md's figures are exactly the
results files (bench/readme.py writes them; nobody copies a figure by hand)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.report import REPORT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("*.json"))


def _in_history(commit: str) -> bool | None:
    """Whether `commit` is HEAD or one of its ancestors; None outside a git checkout."""
    if not (ROOT / ".git").exists():
        return None
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT,
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("path", RESULTS, ids=lambda path: path.name)
def test_every_result_records_the_code_and_machine_it_ran_on(path):
    provenance = json.loads(path.read_text()).get("provenance")
    assert provenance, f"{path.name} does not say which code it ran on: re-run its benchmark"
    assert len(provenance["commit"]) == 40
    assert provenance["report_format"] == REPORT_FORMAT, (
        f"{path.name} ran on {provenance['report_format']}, the engine writes {REPORT_FORMAT}: re-run its benchmark")
    assert _in_history(provenance["commit"]) is not False, f"{path.name} ran on a commit that is not in main's history"
    assert provenance["dirty"] is False, f"{path.name} ran on uncommitted code: re-run it on a clean tree"
    hardware = provenance.get("hardware")
    assert hardware and hardware.get("description"), f"{path.name} does not name the machine it ran on"
    if hardware.get("recorded") is False:  # written before results named their machine: the table says so
        table = path.with_suffix(".md") if path.with_suffix(".md").exists() else path.with_suffix(".txt")
        assert "machine not recorded" in table.read_text().splitlines()[0].lower(), table.name


def test_the_documents_figures_are_the_results_files():
    check = subprocess.run([sys.executable, str(ROOT / "bench" / "readme.py"), "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
