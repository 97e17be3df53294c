"""Hutchinson's estimator of per-layer Hessian traces, and nothing else (after PyHessian).

One Rademacher vector v over all parameter blocks gives, through one Hessian-vector product,
an unbiased sample v_i . (Hv)_i of Tr(H_ii) for every block i at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TraceEstimate:
    mean: float
    stderr: float
    samples: int


class HessianTrace:
    """Per-block Hessian traces of `loss_fn()` with respect to `params` (name -> tensor).

    `loss_fn` must build a fresh graph each call; it may average over several batches.
    """

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: dict[str, torch.Tensor], seed: int = 0):
        self.loss_fn = loss_fn
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.generator = torch.Generator().manual_seed(seed)

    def _rademacher(self, like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, like.shape, generator=self.generator, dtype=torch.int8)
        return (bits.to(like.dtype) * 2 - 1).to(like.device)

    def hvp_samples(self) -> list[float]:
        """One Hutchinson sample per block: v_i . (H v)_i."""
        loss = self.loss_fn()
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        vs = [self._rademacher(p) for p in self.params]
        hvs = torch.autograd.grad(grads, self.params, grad_outputs=vs, allow_unused=True)
        return [0.0 if hv is None else float((hv * v).sum()) for hv, v in zip(hvs, vs)]

    def trace(self, max_samples: int = 32, min_samples: int = 4, rel_tol: float = 0.1) -> dict[str, TraceEstimate]:
        """Sample until every block's standard error is below rel_tol * |mean| (or the cap is reached)."""
        if min_samples < 2 or max_samples < min_samples:
            raise ValueError("need 2 <= min_samples <= max_samples")
        samples: list[list[float]] = []
        while len(samples) < max_samples:
            samples.append(self.hvp_samples())
            if len(samples) >= min_samples and all(
                e.stderr <= rel_tol * abs(e.mean) for e in self._summarise(samples).values()
            ):
                break
        return self._summarise(samples)

    def _summarise(self, samples: list[list[float]]) -> dict[str, TraceEstimate]:
        n = len(samples)
        out = {}
        for i, name in enumerate(self.names):
            column = [s[i] for s in samples]
            mean = sum(column) / n
            var = sum((x - mean) ** 2 for x in column) / (n - 1) if n > 1 else float("inf")
            out[name] = TraceEstimate(mean=mean, stderr=math.sqrt(var / n), samples=n)
        return out
