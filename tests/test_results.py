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


@pytest.mark.parametrize("path", RESULTS, ids=lambda path: path.name)
def test_every_result_records_the_code_it_ran_on_and_is_not_older_than_the_report_format(path):
    provenance = json.loads(path.read_text()).get("provenance")
    assert provenance, f"{path.name} does not say which code it ran on: re-run its benchmark"
    assert len(provenance["commit"]) == 40
    assert provenance["report_format"] == REPORT_FORMAT, (
        f"{path.name} ran on {provenance['report_format']}, the engine writes {REPORT_FORMAT}: re-run its benchmark")


def test_the_documents_figures_are_the_results_files():
    check = subprocess.run([sys.executable, str(ROOT / "bench" / "readme.py"), "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
