"""Per-block Hessian traces by random probing, and nothing else (after PyHessian).

A block is a group of tensors (e.g. one layer's output over several batches). Two estimators share
the sampling loop:
- `HessianTrace`: Hutchinson. One Rademacher v over all blocks gives, through one Hessian-vector
  product (a double backward), an unbiased sample v_i . (Hv)_i of Tr(H_ii) for every block at once.
- `GaussNewtonTrace`: for a loss whose Hessian is JᵀAJ (a fidelity loss at the reference weights),
  one ordinary backward of <f, u> with E[u uᵀ] = A gives Jᵀu, and ‖(Jᵀu)_i‖² is an unbiased sample of
  Tr((JᵀAJ)_ii). No double backward, so it works with kernels that have none (SDPA attention on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Blocks = dict[str, list[torch.Tensor]]


@dataclass
class TraceEstimate:
    mean: float
    stderr: float
    samples: int


class _TraceSampler:
    def __init__(self, blocks: Blocks, seed: int = 0):
        self.names = list(blocks)
        self.blocks = [blocks[n] for n in self.names]
        self.tensors = [t for block in self.blocks for t in block]
        self.generator = torch.Generator().manual_seed(seed)

    def samples(self) -> list[float]:
        """One unbiased sample of every block's trace."""
        raise NotImplementedError

    def _per_block(self, values: list[float]) -> list[float]:
        """Sum per-tensor values into their blocks."""
        out, i = [], 0
        for block in self.blocks:
            out.append(sum(values[i:i + len(block)]))
            i += len(block)
        return out

    def trace(self, max_samples: int = 32, min_samples: int = 4, rel_tol: float = 0.1) -> dict[str, TraceEstimate]:
        """Sample until every block's standard error is below rel_tol * |mean| (or the cap is reached)."""
        if min_samples < 2 or max_samples < min_samples:
            raise ValueError("need 2 <= min_samples <= max_samples")
        drawn: list[list[float]] = []
        while len(drawn) < max_samples:
            drawn.append(self.samples())
            if len(drawn) >= min_samples and all(
                e.stderr <= rel_tol * abs(e.mean) for e in self._summarise(drawn).values()
            ):
                break
        return self._summarise(drawn)

    def _summarise(self, drawn: list[list[float]]) -> dict[str, TraceEstimate]:
        n = len(drawn)
        out = {}
        for i, name in enumerate(self.names):
            column = [s[i] for s in drawn]
            mean = sum(column) / n
            var = sum((x - mean) ** 2 for x in column) / (n - 1) if n > 1 else float("inf")
            out[name] = TraceEstimate(mean=mean, stderr=math.sqrt(var / n), samples=n)
        return out


class HessianTrace(_TraceSampler):
    """Per-block Hessian traces of `loss_fn()`; it must build a fresh graph through the blocks' tensors."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], blocks: Blocks, seed: int = 0):
        super().__init__(blocks, seed)
        self.loss_fn = loss_fn

    def _rademacher(self, like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, like.shape, generator=self.generator, dtype=torch.int8)
        return (bits.to(like.dtype) * 2 - 1).to(like.device)

    def samples(self) -> list[float]:
        grads = torch.autograd.grad(self.loss_fn(), self.tensors, create_graph=True, allow_unused=True)
        # A tensor the loss does not reach, or reaches linearly, has zero curvature.
        curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        vs = [self._rademacher(self.tensors[i]) for i in curved]
        hvs = torch.autograd.grad([grads[i] for i in curved], [self.tensors[i] for i in curved], grad_outputs=vs,
                                  allow_unused=True) if curved else []
        values = [0.0] * len(self.tensors)
        for i, hv, v in zip(curved, hvs, vs):
            values[i] = 0.0 if hv is None else float((hv * v).sum())
        return self._per_block(values)


class GaussNewtonTrace(_TraceSampler):
    """Per-block traces of JᵀAJ. `projection_fn(generator)` returns the scalar <f, u> with E[u uᵀ] = A,
    building a fresh graph through the blocks' tensors."""

    def __init__(self, projection_fn: Callable[[torch.Generator], torch.Tensor], blocks: Blocks, seed: int = 0):
        super().__init__(blocks, seed)
        self.projection_fn = projection_fn

    def samples(self) -> list[float]:
        grads = torch.autograd.grad(self.projection_fn(self.generator), self.tensors, allow_unused=True)
        return self._per_block([0.0 if g is None else float(g.pow(2).sum()) for g in grads])
