"""Measured latency: warm-up, repeated timed runs, median and p90, in the same mode for every model; paired
timings of two calls, interleaved so that machine drift hits both alike; and the reduction one gives over
the other with its uncertainty (the distribution-free interval of a median over the rounds)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from . import cost


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

    @classmethod
    def of(cls, times: list[float]) -> "Latency":
        deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
        return cls(median=statistics.median(times), p90=deciles[8], runs=len(times))

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronise(inputs: tuple[torch.Tensor, ...]) -> None:
    if inputs and inputs[0].is_cuda:
        torch.cuda.synchronize()


def _samples(inputs: tuple) -> int:
    return len(inputs[0]) if inputs else 0


@torch.inference_mode()
def measure(model: torch.nn.Module, workload: "Workload", options: LatencyOptions) -> Latency:
    """The model's latency on one call of the workload, timed `options.repeats` times after a warm-up."""
    call, sync = workload.call(model), workload.sync
    cost.count("timed", (options.warmup + options.repeats) * workload.samples)
    for _ in range(options.warmup):
        call()
    sync()
    times: list[float] = []
    for _ in range(options.repeats):
        t0 = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return Latency.of(times)


@dataclass
class Workload:
    """What one timed call of a model is: one batch of the example inputs, by default; a causal language model
    times a decoding step or a prompt's prefill instead (generation.py)."""

    example: tuple
    name: str = "batch"
    unit: str = "ms per batch"

    @property
    def samples(self) -> int:
        return _samples(self.example)

    @property
    def rows(self) -> int:
        """Input rows each Linear layer sees per call (what a per-shape latency profile times)."""
        return self.example[0].shape[:-1].numel() if self.example[0].is_floating_point() else self.example[0].numel()

    def sync(self) -> None:
        _synchronise(self.example)

    def call(self, model: torch.nn.Module):
        """A function that runs one timed call of `model` (set up, if the workload needs it, beforehand)."""
        return lambda: model(*self.example)


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
    first_rounds: list[float] = field(default_factory=list, repr=False)  # per round, ms per call
    second_rounds: list[float] = field(default_factory=list, repr=False)

    def reduction(self, confidence: float = 0.95) -> "Reduction":
        """How much faster the second call is, as a share of the first: the median over rounds of each round's
        1 - second / first, with the distribution-free interval for a median (order statistics of the rounds'
        shares, from the binomial distribution: the sign test's interval). "Faster" (the whole interval above
        zero) is then a one-sided sign test at level (1 - confidence) / 2 or less: two calls that do not differ
        are called faster at most that often, whatever the noise's shape, provided rounds are independent.
        (A percentile bootstrap of the median, which this replaced, called 2.8% of identical pairs faster at a
        nominal 2.5%, and 10.2% with the early stop it was used with.)"""
        shares = sorted(1 - b / a for a, b in zip(self.first_rounds, self.second_rounds))
        rank = median_rank(len(shares), confidence)
        low, high = (shares[rank], shares[-1 - rank]) if rank is not None else (-math.inf, math.inf)
        return Reduction(statistics.median(shares), low, high, len(shares), confidence)


def median_rank(n: int, confidence: float) -> int | None:
    """The 0-based rank k such that [x(k), x(n-1-k)] of n sorted independent values covers their median with at
    least `confidence`: the largest k with P(Binomial(n, 1/2) <= k) <= (1 - confidence) / 2. None when even
    [min, max] covers it less often (fewer than 6 rounds at 95%)."""
    tail, cumulative, rank = (1 - confidence) / 2, 0.0, None
    for k in range(n):
        cumulative += math.comb(n, k) / 2 ** n
        if cumulative > tail:
            break
        rank = k
    return rank


@dataclass
class Reduction:
    """A latency reduction with its interval: `faster` only when the whole interval is above zero."""

    median: float
    low: float
    high: float
    rounds: int
    confidence: float

    @property
    def faster(self) -> bool:
        return self.low > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "faster": self.faster}


@torch.inference_mode()
def paired(first, second, rounds: int = 15, inner: int = 3, warmup: int = 2, cuda: bool = False,
           samples: int = 0) -> Paired:
    """A fixed number of rounds, each timing `inner` calls of both, which goes first alternating from round to
    round (a call that runs second in a warm cache is not always the same one). `samples` per call, for the
    cost ledger. The number of rounds is fixed: stopping once an interval clears zero would look at the data
    many times and call identical calls faster far more often than its level says."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        first(), second()
    sync()
    a, b = [], []
    for round_ in range(rounds):
        if round_ % 2:
            b.append(_timed(second, inner, sync))
            a.append(_timed(first, inner, sync))
        else:
            a.append(_timed(first, inner, sync))
            b.append(_timed(second, inner, sync))
    cost.count("timed", 2 * (warmup + rounds * inner) * samples)
    differences = sorted(x - y for x, y in zip(a, b))
    quartiles = statistics.quantiles(differences, n=4, method="inclusive") if rounds > 1 else [0.0, 0.0, 0.0]
    return Paired(statistics.median(a), statistics.median(b), statistics.median(differences),
                  (quartiles[2] - quartiles[0]) / math.sqrt(rounds), a, b)
