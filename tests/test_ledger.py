"""The cost ledger counts every sample pass: in every phase of a real run, the samples that went through the
model's forward (however it was called: metric, timing, simulation, calibration, capturing inputs, finding
unused layers) are no more than what that phase's ledger says it spent."""

from collections import Counter

import torch

from worker.engine import Budget, CompressOptions, DataOptions, LatencyOptions, SensitivityOptions, compress
from worker.engine.adapters import ModelAdapter
from worker.engine import cost


def _watch(seen: Counter):
    """Count the samples of every top-level model forward (an adapter, or the copy a plan is built on), charged
    to the ledger phase current when it ran."""
    def pre(module, args):
        if isinstance(module, ModelAdapter) and args and isinstance(args[0], torch.Tensor):
            current = cost._current.get()
            seen[current[1] if current else None] += len(args[0])
    return torch.nn.modules.module.register_module_forward_pre_hook(pre)


def test_no_phase_runs_the_model_on_more_samples_than_it_counts(cache_dir):
    seen = Counter()
    handle = _watch(seen)
    try:
        report = compress("builtin:minilm", CompressOptions(
            budget=Budget(0.004, confidence=0.5),  # not every layer fits: profile, analysis and search all run
            sensitivity=SensitivityOptions(hutchinson_max_samples=4, hessian_batches=1, interlayer_batches=1),
            data=DataOptions(calibration_samples=16, eval_samples=32, test_samples=32, seq_len=32, batch_size=8),
            latency=LatencyOptions(warmup=1, repeats=7, profile_seconds=0.02), cache_dir=cache_dir))
    finally:
        handle.remove()
    phases = report.cost["phases"]
    assert {"load", "profile", "sensitivity", "search"} <= {p for p, n in seen.items() if n}
    for phase, samples in seen.items():
        assert phase is not None, "a model ran outside every phase"
        counted = sum(phases[phase][kind] for kind in cost.KINDS)
        assert samples <= counted, f"{phase}: {samples} samples through the model, {counted} counted"
