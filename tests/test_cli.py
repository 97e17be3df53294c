"""End to end through the real `mixq` console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.engine import load_artifact
from worker.engine.adapters import adapt
from worker.engine.builtins import load_builtin
from worker.engine.data import DataOptions
from worker.engine.pipeline import PHASES

MIXQ = [sys.executable, "-m", "app.cli"]
REPORT_KEYS = {"source", "revision", "environment", "baseline", "final", "latency_reduction", "layers", "search",
               "phases", "warnings", "skipped_layers", "plan"}
LAYER_KEYS = {"name", "kind", "params", "output_error", "hessian_trace", "trace_stderr", "hessian_term", "interlayer",
              "score", "rank", "precision"}


def run(*args, env=None):
    return subprocess.run([*MIXQ, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("digits")
    result = run("compress", "builtin:digits-resnet", "--budget", "0.01", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_compress_digits_resnet_within_budget_with_measured_latency(digits_run):
    out, result = digits_run
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert {"torch", "device"} <= report["environment"].keys()
    for side in ("baseline", "final"):
        assert {"metric", "test_metric", "latency_ms", "size_bytes"} <= report[side].keys()
        assert report[side]["latency_ms"]["median"] > 0
        assert report[side]["latency_ms"]["p90"] >= report[side]["latency_ms"]["median"]
    assert report["baseline"]["metric"] >= 0.95  # the builtin is a real classifier on held-out digits
    assert report["final"]["drop"] <= 0.01
    # Whether int8 beats fp32 here depends on the machine's load: the report must be consistent either way.
    reduction = report["latency"]["reduction"]
    assert reduction["low"] <= reduction["median"] <= reduction["high"]
    if report["status"] == "compressed":
        assert reduction["low"] > 0 and report["latency_reduction"] == reduction["median"]
    else:
        assert report["final"]["k"] == 0 and report["latency_reduction"] == 0
    assert len(report["layers"]) == 13 and all(LAYER_KEYS <= layer.keys() for layer in report["layers"])
    assert sorted(layer["rank"] for layer in report["layers"]) == list(range(13))
    search = report["search"]
    assert {"ordering", "evaluations", "steps"} <= search.keys()
    assert search["evaluations"] == len(search["steps"]) <= search["max_evaluations"]
    assert all({"k", "metric", "latency_ms", "accepted"} <= step.keys() for step in search["steps"])
    assert set(report["phases"]) == set(PHASES) and set(report["cost"]["phases"]) == set(PHASES)
    assert "top1_accuracy (eval)" in result.stdout and "(test)" in result.stdout
    # No library noise (torchao's missing GPU extensions, pytree notices, progress bars of weight loading).
    noise = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("[", "wrote "))]
    assert noise == []
    assert "latency reduction" in result.stdout and "on the test split" in result.stdout


def test_artifact_reapplies_to_the_original_model(digits_run, cache_dir):
    out, _ = digits_run
    report = json.loads((out / "report.json").read_text())
    builtin = load_builtin("digits-resnet", DataOptions(), cache_dir)
    adapter, data = adapt(builtin.model, builtin.task), builtin.default_data()
    x = data.evaluation[0]["pixel_values"]
    model = load_artifact(adapter, out / "artifact", (x,))
    with torch.inference_mode():
        accuracy = torch.cat([model(b["pixel_values"]).argmax(-1) == b["labels"] for b in data.evaluation])
    assert float(accuracy.float().mean()) == pytest.approx(report["final"]["metric"])
    int8 = [layer["name"] for layer in report["layers"] if layer["precision"] == "int8"]
    assert len(int8) == report["final"]["k"]


@pytest.mark.parametrize("args, message", [
    (["compress", "builtin:nope", "--budget", "0.01"], "unknown builtin model"),
    (["compress", "hf:../../etc", "--budget", "0.01"], "invalid Hugging Face model ID"),
    (["compress", "builtin:digits-resnet", "--budget", "1.5"], "budget must be in (0, 1)"),
    (["compress", "builtin:digits-resnet", "--budget", "0"], "budget must be in (0, 1)"),
    (["compress", "builtin:digits-resnet", "--budget", "abc"], "is not a number"),
    (["compress", "builtin:digits-resnet"], "--budget"),
    (["compress", "builtin:digits-resnet", "--budget", "0.01", "--precisions", "int8,int2"], "int4wo"),
    (["compress", "builtin:digits-resnet", "--budget", "0.01", "--latency", "prefill"],
     "for causal language models"),
])
def test_bad_input_exits_2_with_a_clear_message(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_path_escaping_the_root_exits_2(tmp_path):
    (tmp_path / "root").mkdir()
    result = run("compress", "local:../", "--budget", "0.01", env={"MIXQ_MODEL_ROOT": str(tmp_path / "root")})
    assert result.returncode == 2
    assert "names nothing under the allowed root" in result.stderr and "Traceback" not in result.stderr


def test_workers_run_from_their_own_folder_with_absolute_paths(tmp_path):
    """A relative MIXQ_DATA_DIR is resolved once, where the operator started mixq; the worker then runs
    elsewhere, so nothing a job names can resolve against the operator's current directory."""
    probe = ("from app.cli.service import worker_process; command, env, work = worker_process(); "
             "print(work); print(env['MIXQ_DATA_DIR']); print(env['MIXQ_DATABASE_URL']); print(env['MIXQ_BROKER_URL'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXQ_")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**env, "MIXQ_DATA_DIR": "state", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    work, data_dir, database, broker = result.stdout.split()
    assert work == str(tmp_path / "state" / "work") and data_dir == str(tmp_path / "state")
    assert database == f"sqlite:///{tmp_path}/state/mixq.db" and broker == f"sqla+sqlite:///{tmp_path}/state/broker.db"


def test_candidates_kept_float_are_named_when_few_and_counted_per_format_when_many():
    from worker.engine.report import _excluded

    assert _excluded(["a.q", "a.k"], "int8") == "a.q, a.k"
    many = [f"layers.{i}.q@{fmt}" for i in range(30) for fmt in ("int8", "bf16")] + ["lm_head@int8wo"]
    summary = _excluded(many, "int8/int8wo/int4wo/bf16")
    assert summary.startswith("61 candidates (30 in bf16, 30 in int8, 1 in int8wo)")
    assert "layers.3.q" not in summary
    # One format per layer (a conv net's static int8): plain layer names count in the backend's format.
    assert _excluded([f"blocks.{i}.conv" for i in range(20)], "int8").startswith("20 candidates (20 in int8)")
