"""Every benchmark runs at HEAD: each script in its smoke mode (tiny sizes, its own code paths), writing to a
scratch folder. Their figures mean nothing; that they run is what this checks, so none can rot unnoticed
(two did: confidence.py and peers.py called `select()` with an argument short for 33 commits)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Each script with the arguments that keep its smoke run to seconds, and the file it must write.
SCRIPTS = {
    "confidence.py": (["--models", "minilm", "--resamples", "2"], "confidence.json"),
    "exports.py": (["--models", "digits-resnet"], "onnx.json"),
    "full_size.py": (["--models", "digits-resnet"], "full_size.json"),
    "linear_kernels.py": ([], "kernels.json"),
    "llm.py": ([], "llm.json"),
    "llamacpp.py": ([], "llamacpp.json"),
    "ggml_simulation.py": ([], "ggml_simulation.json"),
    "lm_kernels.py": ([], "lm_kernels.json"),
    "load.py": ([], "load.json"),
    "ordering.py": (["--models", "digits-resnet"], "ordering.json"),
    "peers.py": (["--models", "minilm-sentiment", "--budgets", "0.05", "--rounds", "3"], "peers.json"),
    "simulation.py": (["--models", "digits-resnet", "--batches", "1", "--eval-samples", "16"], "simulation.json"),
    "worked_example.py": ([], "worked-example.json"),
}


def test_every_script_in_bench_is_covered():
    scripts = {p.name for p in BENCH.glob("*.py")}
    # common.py and nncf_peer.py are libraries of the others; readme.py is checked by test_results.py;
    # gpu_check.py needs a CUDA device (test below).
    assert scripts - {"common.py", "nncf_peer.py", "readme.py", "gpu_check.py"} == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_runs_at_head(script, tmp_path):
    if script == "load.py" and not shutil.which("wrk"):
        if os.environ.get("CI"):
            pytest.fail("bench/load.py needs wrk: .ci/run installs it")
        pytest.skip("bench/load.py needs wrk (apt-get install wrk)")
    arguments, written = SCRIPTS[script]
    result = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(tmp_path), *arguments],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / written).exists()


def test_a_smoke_run_cannot_overwrite_the_committed_results():
    result = subprocess.run([sys.executable, str(BENCH / "lm_kernels.py"), "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0 and "scratch folder" in result.stderr


def test_the_gpu_check_says_so_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/gpu_check.py is a real run, not a smoke check")
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "no CUDA device" in result.stderr


def test_kept_results_are_tabled_under_the_machine_that_measured_them():
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    elsewhere = {"hardware": {"description": "a CPU elsewhere"}}
    results = [{"model": "kept-a", "provenance": elsewhere}, {"model": "new"}, {"model": "kept-b", "provenance": elsewhere}]
    table = common.by_machine(results, lambda group: ", ".join(r["model"] for r in group))
    assert table.split("\n\n") == ["Measured on a CPU elsewhere.", "kept-a, kept-b\n" + common.hardware_line(), "new"]
    assert common.hardware_line() != "Measured on a CPU elsewhere."
