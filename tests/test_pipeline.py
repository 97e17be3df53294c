"""The pipeline on the real all-MiniLM-L6-v2 weights, small sizes: a search that actually bisects."""

import pytest

from worker.engine import Budget, CompressOptions, DataOptions, LatencyOptions, Report, SensitivityOptions, compress
from worker.engine import pipeline
from worker.engine.errors import Cancelled
from worker.engine.search import Step


def options(cache_dir, **overrides):
    return CompressOptions(**{
        "budget": Budget(0.01),
        "sensitivity": SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1, interlayer_batches=1),
        "data": DataOptions(calibration_samples=16, eval_samples=48, test_samples=64, seq_len=32, batch_size=8),
        "latency": LatencyOptions(warmup=2, repeats=5, profile_seconds=0.05),
        "cache_dir": cache_dir,
        **overrides,
    })


def test_minilm_search_bisects_within_budget(cache_dir, tmp_path):
    events = []
    report = compress("builtin:minilm", options(cache_dir, out_dir=tmp_path), progress=events.append).to_dict()
    search = report["search"]
    assert report["metric"]["name"] == "cosine_fidelity" and report["baseline"]["metric"] == pytest.approx(1.0)
    assert report["baseline"]["test_metric"] == pytest.approx(1.0)
    assert report["environment"]["attention"] == "sdpa"  # what users deploy, not the Hessian's eager kernel
    assert search["method"]["hessian"] == "gauss-newton" and report["warnings"] == []
    assert len(report["layers"]) == 36  # the unused pooler is listed as skipped, never quantized
    assert [s["name"] for s in report["skipped_layers"]] == ["model.pooler.dense"]
    assert "model.pooler.dense" not in report["plan"]["layers"]
    order = search["order"]
    assert search["selection"] == "cost-aware" and sorted(order) == sorted(
        l["name"] for l in report["layers"] if not l["excluded"])
    assert search["evaluations"] <= search["max_evaluations"] == 8 + 3  # bisection bound + refinement
    assert all(l["latency_saving_ms"] is not None for l in report["layers"])
    assert all(l["precision"] == "fp32" for l in report["layers"] if l["excluded"])
    assert search["latency_model"]["timed_plans"] == sum(s["latency_ms"] is not None for s in search["steps"])
    assert all(s["predicted_latency_ms"] > 0 for s in search["steps"])
    assert report["final"]["drop"] <= 0.01
    assert 0 < report["final"]["test_metric"] <= 1
    assert report["final"]["test_drop"] == pytest.approx(
        (report["baseline"]["test_metric"] - report["final"]["test_metric"]) / report["baseline"]["test_metric"])
    accepted = [s for s in search["steps"] if s["accepted"]]
    assert all(s["latency_ms"] is not None for s in accepted)
    assert all(s["latency_ms"] is None for s in search["steps"] if not s["accepted"])
    if report["status"] == "compressed":
        assert report["final"]["latency_ms"]["median"] < report["baseline"]["latency_ms"]["median"]
        assert report["latency_reduction"] > 0
        chosen = [s for s in search["steps"] if s["chosen"]]
        assert len(chosen) == 1 and chosen[0]["k"] == report["final"]["k"]
    else:
        assert report["final"]["k"] == 0 and report["latency_reduction"] == 0
    int8 = {l["name"] for l in report["layers"] if l["precision"] == "int8"}
    chosen = [Step(**s) for s in search["steps"] if s["chosen"]]
    assert int8 == (set(chosen[0].low(order)) if chosen else set())  # the chosen step's layers, nothing else
    assert int8 == {n for n, p in report["plan"]["layers"].items() if p == "int8"}
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e.phase for e in events} == {"load", "baseline", "sensitivity", "profile", "search", "final", "onnx",
                                         "export"}
    assert (tmp_path / "report.json").exists() and (tmp_path / "artifact" / "plan.json").exists()
    assert Report.read(tmp_path / "report.json").to_dict() == report


def test_a_plan_over_budget_on_the_test_split_is_a_warning(cache_dir, monkeypatch):
    """The test split is scored once, after every decision; if the plan breaks the budget there, say so."""
    from worker.engine.evaluation import Evaluator

    metric = Evaluator.metric

    def pessimistic_test_split(self, model, split="evaluation"):
        value = metric(self, model, split)
        return value - 0.05 if split == "test" and model is not self_baseline[0] else value

    self_baseline = []
    original_prepare = pipeline.prepare

    def prepare(source, opts):
        bench = original_prepare(source, opts)
        self_baseline.append(bench.backend.baseline)
        return bench

    monkeypatch.setattr(pipeline, "prepare", prepare)
    monkeypatch.setattr(Evaluator, "metric", pessimistic_test_split)
    report = compress("builtin:digits-resnet", options(cache_dir))
    assert report.final.k > 0 and report.final.drop <= 0.01 < report.final.test_drop
    assert any("on the test split the plan drops" in w for w in report.warnings)


def test_a_model_whose_layers_save_no_time_returns_the_baseline_unsearched(cache_dir, monkeypatch):
    """Spending accuracy on layers that save nothing would only make the model worse: no search runs."""
    from worker.engine.kernels import LatencyProfile

    monkeypatch.setattr(LatencyProfile, "measurable", lambda self, name: False)
    report = compress("builtin:digits-resnet", options(cache_dir))
    assert (report.status, report.final.k, report.search["evaluations"]) == ("no_saving", 0, 0)
    assert report.final.metric == report.baseline.metric
    assert all(layer["excluded"] == "no measurable latency saving" for layer in report.layers)


def test_progress_callback_can_cancel_at_a_step_boundary(cache_dir):
    def cancel_in_search(event):
        if event.phase == "search" and event.step:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        compress("builtin:digits-resnet", options(cache_dir), progress=cancel_in_search)


def test_warm_start_reuses_the_stored_analysis(cache_dir):
    from worker.engine.sensitivity import Sensitivity

    first = compress("builtin:digits-resnet", options(cache_dir)).to_dict()
    warm = compress("builtin:digits-resnet", options(cache_dir, budget=Budget(0.02),
                                                     reuse_sensitivity=Sensitivity.from_report(first)))
    assert warm.search["method"]["reused"] is True
    assert [l["rank"] for l in warm.layers] == [l["rank"] for l in first["layers"]]
    assert warm.phases["sensitivity"] < first["phases"]["sensitivity"] / 5
