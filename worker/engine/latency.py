"""Measured latency: warm-up, repeated timed runs, median and p90, in the same mode for every model; and
paired timings of two calls, interleaved so that machine drift hits both alike."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class LatencyOptions:
    warmup: int = 3
    repeats: int = 15
    profile_seconds: float = 0.5  # timing per layer when the latency profile measures what each saves


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


def _timed(call, inner: int, sync) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        call()
    sync()
    return (time.perf_counter() - t0) * 1000 / inner


@dataclass
class Paired:
    """Two calls timed in alternating rounds: per-call medians, the median paired difference, and that
    median's noise (about its standard error: the differences' interquartile range over sqrt(rounds))."""

    first_ms: float
    second_ms: float
    difference_ms: float  # first - second
    noise_ms: float


@torch.inference_mode()
def paired(first, second, rounds: int = 9, inner: int = 3, warmup: int = 2, cuda: bool = False) -> Paired:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        first(), second()
    sync()
    a, b = [], []
    for _ in range(rounds):
        a.append(_timed(first, inner, sync))
        b.append(_timed(second, inner, sync))
    differences = sorted(x - y for x, y in zip(a, b))
    quartiles = statistics.quantiles(differences, n=4, method="inclusive") if rounds > 1 else [0.0, 0.0, 0.0]
    return Paired(statistics.median(a), statistics.median(b), statistics.median(differences),
                  (quartiles[2] - quartiles[0]) / math.sqrt(rounds))
