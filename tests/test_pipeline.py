"""The pipeline end to end on real weights at small sizes: the cheap path when every layer fits, a real search
when it does not, acceptance with the drop's standard error, timings with their interval, and the cost ledger.

Tests about the search or the reports stub the final timing (`faster`/`slower`): their outcome must not
depend on how loaded the machine is. The profile and the search's own timings stay real."""

import pytest

from worker.engine import Budget, CompressOptions, DataOptions, LatencyOptions, Report, SensitivityOptions, compress
from worker.engine import pipeline
from conftest import integer_menu, timed_as
from worker.engine.errors import Cancelled
from worker.engine.search import Step


def options(cache_dir, **overrides):
    return CompressOptions(**{
        "budget": Budget(0.01, confidence=0.5),
        "sensitivity": SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1, interlayer_batches=1),
        "data": DataOptions(calibration_samples=16, eval_samples=48, test_samples=64, seq_len=32, batch_size=8),
        "latency": LatencyOptions(warmup=2, repeats=5, profile_seconds=0.05),
        "cache_dir": cache_dir,
        **overrides,
    })


@pytest.fixture(scope="module", autouse=True)
def cpu_independent_menu():
    """Every test here sees the same formats on every CPU (the menu's own tests are in test_hardware.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_or_measure", integer_menu)
        yield


@pytest.fixture
def faster(monkeypatch):
    monkeypatch.setattr(pipeline, "paired", timed_as(0.6))


# Every MiniLM Linear in int8 (8-bit activations) drops cosine fidelity by about 0.6%: a tighter budget searches.
MINILM_BUDGET = Budget(0.004, confidence=0.5)


@pytest.fixture(scope="module")
def minilm(cache_dir, tmp_path_factory):
    """One MiniLM run at 0.4% (confidence 0.5), with its progress events and output folder."""
    events, out = [], tmp_path_factory.mktemp("minilm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "paired", timed_as(0.6))
        report = compress("builtin:minilm", options(cache_dir, out_dir=out, budget=MINILM_BUDGET),
                          progress=events.append)
    return report, events, out


@pytest.fixture
def slower(monkeypatch):
    monkeypatch.setattr(pipeline, "paired", timed_as(1.02))


def test_every_layer_within_budget_is_one_evaluation_with_no_analysis(cache_dir, faster):
    """digits-resnet keeps its accuracy with every layer in int8: the probe answers, and neither the latency
    profile nor the sensitivity analysis runs (nothing simulated, no backward pass)."""
    report = compress("builtin:digits-resnet", options(cache_dir, budget=Budget(0.05, confidence=0.5)))
    assert report.status == "compressed" and report.final.k == len(report.layers)
    assert [s["stage"] for s in report.search["steps"]] == ["probe"] and report.search["steps"][0]["chosen"]
    assert "not needed" in report.search["method"]["analysis"] and "not needed" in report.search["profile"]
    assert all(layer["score"] is None and layer["latency_saving_ms"] is None for layer in report.layers)
    phases = report.cost["phases"]
    assert report.cost["total"]["simulated"] == 0
    # The only backward pass is the load's search for layers that do not reach the output: one example batch.
    assert phases["load"]["backward"] == report.data["batch_size"] and phases["sensitivity"]["backward"] == 0
    assert phases["probe"]["forward"] >= report.data["evaluation"]  # the plan was scored
    # The plan returned is the one timed against the baseline, and its reduction is that timing's.
    assert report.latency["reduction"]["faster"] and report.latency_reduction == report.latency["reduction"]["median"]
    assert report.final.accepted_by.startswith("the probe step")


def test_minilm_searches_when_not_every_layer_fits(minilm):
    report, events, out = minilm
    report = report.to_dict()
    search, steps = report["search"], report["search"]["steps"]
    assert report["metric"]["name"] == "cosine_fidelity" and report["baseline"]["metric"] == pytest.approx(1.0)
    assert report["environment"]["attention"] == "sdpa"  # what users deploy, not the Hessian's eager kernel
    assert search["method"]["hessian"] == "gauss-newton" and report["warnings"] == []
    assert [s["name"] for s in report["skipped_layers"]] == ["model.pooler.dense"]
    assert "model.pooler.dense" not in report["plan"]["layers"]
    # Every layer in int8 breaks a 0.4% budget on MiniLM, so the probe fails and a real search follows it.
    assert steps[0]["stage"] == "probe" and not steps[0]["accepted"] and steps[0]["k"] == 36
    assert any(s["stage"] == "bisection" for s in steps) and any(s["accepted"] for s in steps)
    assert report["cost"]["phases"]["sensitivity"]["simulated"] > 0
    assert report["cost"]["phases"]["sensitivity"]["backward"] > 0
    assert report["cost"]["total"]["forward"] >= len(steps) * report["data"]["evaluation"]
    assert report["status"] == "compressed"
    chosen = [Step(**s) for s in steps if s["chosen"]]
    assert len(chosen) == 1 and chosen[0].accepted and chosen[0].bound <= MINILM_BUDGET.max_drop
    int8 = {layer["name"] for layer in report["layers"] if layer["precision"] == "int8"}
    assert int8 == set(chosen[0].low(search["order"])) and len(int8) == report["final"]["k"] > 0
    assert int8 == {n for n, p in report["plan"]["layers"].items() if p == "int8"}
    low, high = report["final"]["test_drop_interval"]
    assert low < report["final"]["test_drop"] < high and report["final"]["test_stderr"] > 0
    accepted = [s for s in steps if s["accepted"]]
    assert all(s["latency_ms"] is not None for s in accepted)
    assert all(s["latency_ms"] is None for s in steps if not s["accepted"])
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e.phase for e in events} == set(pipeline.PHASES)
    assert Report.read(out / "report.json").to_dict() == report


def test_a_plan_is_accepted_only_when_its_drop_plus_z_standard_errors_fits(cache_dir, minilm, faster):
    """At a confidence of 0.5 the drop alone decides; at 0.99 every accepted plan keeps a margin of 2.3 of its
    standard errors below the budget (tests/test_search.py shows what that does to the chosen k)."""
    loose = minilm[0]
    strict = compress("builtin:minilm", options(cache_dir, budget=Budget(MINILM_BUDGET.max_drop, confidence=0.99)))
    for report in (loose, strict):
        z = report.budget["z"]
        for step in report.search["steps"]:
            assert step["accepted"] == (step["drop"] + z * step["stderr"] <= MINILM_BUDGET.max_drop)
            assert step["stderr"] > 0
    assert loose.budget["z"] == 0 and strict.budget["z"] > 2.3
    assert strict.final.k == 0 or strict.final.drop + 2.3 * strict.final.stderr <= MINILM_BUDGET.max_drop


def test_a_plan_that_is_not_measurably_faster_is_not_returned(cache_dir, slower):
    report = compress("builtin:digits-resnet", options(cache_dir, budget=Budget(0.05, confidence=0.5)))
    assert report.status == "no_speedup" and report.final.k == 0 and report.latency_reduction == 0.0
    assert report.latency["reduction"]["low"] < 0 < report.latency["reduction"]["high"] or \
        report.latency["reduction"]["high"] < 0
    assert report.plan.low_precision_layers == []


def test_a_plan_over_budget_on_the_test_split_is_a_warning(cache_dir, monkeypatch, faster):
    """The test split is scored once, after every decision; if the plan breaks the budget there, say so."""
    from worker.engine.evaluation import Evaluator

    scores = Evaluator.scores

    def pessimistic_test_split(self, model, split="evaluation"):
        values = scores(self, model, split)
        return [v - 0.05 for v in values] if split == "test" else values

    monkeypatch.setattr(Evaluator, "scores", pessimistic_test_split)
    report = compress("builtin:digits-resnet", options(cache_dir, budget=Budget(0.02, confidence=0.5)))
    assert report.final.k > 0 and report.final.drop <= 0.02 < report.final.test_drop
    assert any("on the test split the plan drops" in w for w in report.warnings)


def test_a_model_whose_layers_save_no_time_returns_the_baseline_unsearched(cache_dir, monkeypatch, slower):
    """Spending accuracy on layers that save nothing would only make the model worse: no search runs."""
    from worker.engine.kernels import LatencyProfile

    monkeypatch.setattr(LatencyProfile, "measurable", lambda self, name: False)
    report = compress("builtin:digits-resnet", options(cache_dir, budget=Budget(0.05, confidence=0.5)))
    assert (report.status, report.final.k) == ("no_saving", 0)
    assert [s["stage"] for s in report.search["steps"]] == ["probe"]  # it was not faster; nothing else ran
    assert report.final.metric == report.baseline.metric
    assert all(layer["excluded"] == pipeline.NO_SAVING for layer in report.layers)


def test_progress_callback_can_cancel_at_a_step_boundary(cache_dir):
    def cancel_in_probe(event):
        if event.phase == "probe" and event.step:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        compress("builtin:digits-resnet", options(cache_dir), progress=cancel_in_probe)


def test_warm_start_reuses_the_stored_analysis(cache_dir, minilm, faster):
    from worker.engine.sensitivity import Sensitivity

    first = minilm[0].to_dict()
    assert Sensitivity.from_report(first) is not None
    warm = compress("builtin:minilm", options(cache_dir, budget=Budget(0.003, confidence=0.5),
                                              reuse_sensitivity=Sensitivity.from_report(first)))
    assert warm.search["method"]["reused"] is True
    assert [l["rank"] for l in warm.layers] == [l["rank"] for l in first["layers"]]
    assert warm.cost["phases"]["sensitivity"]["simulated"] == 0


def test_an_analysis_that_never_ran_is_never_reused(cache_dir, faster):
    from worker.engine.sensitivity import Sensitivity

    easy = compress("builtin:digits-resnet", options(cache_dir, budget=Budget(0.05, confidence=0.5))).to_dict()
    assert Sensitivity.from_report(easy) is None


def _cast_timing(plan_vs_cast: float):
    """The final timings, stubbed by which models they compare: any plan takes 0.6 of fp32's time, and
    `plan_vs_cast` of the whole-model cast's."""
    from worker.engine.kernels import WholeCast

    def timed_pair(first, second, workload, options):
        ratio = plan_vs_cast if isinstance(first, WholeCast) else 0.6
        return timed_as(ratio)(workload.call(first), workload.call(second))
    return timed_pair


@pytest.mark.parametrize("plan_vs_cast", [0.8, 1.05])
def test_a_plan_must_also_beat_the_whole_model_cast_to_the_baseline_float(cache_dir, tmp_path, faster, monkeypatch,
                                                                          plan_vs_cast):
    """With a bf16 baseline (named here; `auto` picks it where the CPU runs bf16 natively), the reduction is
    reported against fp32 and against the cast, and a plan slower than the cast gives way to the cast, which
    re-applies from its artifact."""
    import torch

    from worker.engine.artifact import load_artifact
    from worker.engine.kernels import WHOLE_CAST, WholeCast

    monkeypatch.setattr(pipeline, "_timed_pair", _cast_timing(plan_vs_cast))
    report = compress("builtin:minilm", options(cache_dir, out_dir=tmp_path, baseline="bf16",
                                                budget=Budget(0.05, confidence=0.5)))
    against = report.latency["against"]
    assert report.latency["baseline"] == {"asked": "bf16", "beaten": "bf16", "accuracy_against": "fp32"}
    if plan_vs_cast < 1:
        assert report.status == "compressed" and report.final.k > 0
        assert against["bf16"]["median"] == pytest.approx(0.2) and against["fp32"]["median"] == pytest.approx(0.4)
        return
    assert report.status == "float_cast" and report.final.k == 0 and against["bf16"] is None
    assert any("cast to bf16" in w and "is returned" in w for w in report.warnings)
    assert report.plan.backend == WHOLE_CAST and set(report.plan.layers.values()) == {"bf16"}
    assert 0 <= report.final.drop < 0.05 and report.final.accepted_by.startswith("the whole model cast to bf16")
    bench = pipeline.prepare("builtin:minilm", options(cache_dir))
    reloaded = load_artifact(bench.adapter, tmp_path / "artifact", bench.example)
    assert isinstance(reloaded, WholeCast) and reloaded.dtype == torch.bfloat16
    assert report.final.test_metric < report.baseline.test_metric  # the cast's own figures, not the baseline's


def test_a_conv_net_returns_the_cast_of_the_graph_it_was_timed_as(cache_dir, tmp_path, faster, monkeypatch):
    """A conv net's baseline and plans run as its folded graph (BatchNorm folded, channels-last): when no plan
    beats that graph cast to bf16, the cast is returned, and its artifact re-applies the same graph, scoring
    what the report says on the test split."""
    import statistics

    import torch

    from worker.engine.artifact import load_artifact
    from worker.engine.kernels import FX_STATIC, WHOLE_CAST, WholeCast
    from worker.engine.plan import FOLDED_GRAPH

    monkeypatch.setattr(pipeline, "_timed_pair", _cast_timing(1.05))
    report = compress("builtin:digits-resnet", options(cache_dir, out_dir=tmp_path, baseline="bf16",
                                                       budget=Budget(0.05, confidence=0.5)))
    assert report.backend["name"] == FX_STATIC
    assert report.status == "float_cast" and report.final.k == 0
    assert report.plan.backend == WHOLE_CAST and report.plan.cast_of == FOLDED_GRAPH
    assert any("BatchNorm folded" in w and "is returned" in w for w in report.warnings)
    bench = pipeline.prepare("builtin:digits-resnet", options(cache_dir))
    reloaded = load_artifact(bench.adapter, tmp_path / "artifact", bench.example)
    assert isinstance(reloaded, WholeCast) and isinstance(reloaded.cast, torch.fx.GraphModule)
    assert statistics.fmean(bench.evaluator.scores(reloaded, "test")) == pytest.approx(report.final.test_metric)
