"""Measured latency: warm-up, repeated timed runs, median and p90, in the same mode for every model."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class LatencyOptions:
    warmup: int = 3
    repeats: int = 15


@dataclass
class Latency:
    median: float  # milliseconds per batch
    p90: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronise(inputs: tuple[torch.Tensor, ...]) -> None:
    if inputs and inputs[0].is_cuda:
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], options: LatencyOptions) -> Latency:
    for _ in range(options.warmup):
        model(*inputs)
    _synchronise(inputs)
    times: list[float] = []
    for _ in range(options.repeats):
        t0 = time.perf_counter()
        model(*inputs)
        _synchronise(inputs)
        times.append((time.perf_counter() - t0) * 1000)
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Latency(median=statistics.median(times), p90=deciles[8], runs=len(times))
