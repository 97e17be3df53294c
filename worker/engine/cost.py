"""What a run spends, counted the same way for every method: samples through forward passes of the models
as delivered (float or real low-precision kernels; metrics and calibration), through timed forward passes,
through the simulation the sensitivity analysis uses, and through backward passes; with wall time.

A `Ledger` is made current for a block (`with ledger.phase("search"):`); code that runs a model calls
`count(kind, samples)`, which adds to the current ledger's current phase, or does nothing when none is
current. So the pipeline and a benchmark's re-implemented peers are charged by the same calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import asdict, dataclass

KINDS = ("forward", "timed", "simulated", "backward")


@dataclass
class Spent:
    forward: int = 0  # samples through the model as delivered: metrics, calibration, reference outputs
    timed: int = 0  # samples through forward passes run to time them
    simulated: int = 0  # samples through the simulated kernels (sensitivity analysis)
    backward: int = 0  # samples through backward passes (Hessian traces; a Hessian-vector product counts 2)
    seconds: float = 0.0

    def add(self, other: "Spent") -> None:
        for kind in (*KINDS, "seconds"):
            setattr(self, kind, getattr(self, kind) + getattr(other, kind))

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


_current: contextvars.ContextVar["tuple[Ledger, str] | None"] = contextvars.ContextVar("mixq_ledger", default=None)


class Ledger:
    def __init__(self) -> None:
        self.phases: dict[str, Spent] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Charge everything counted in this block, and its wall time, to phase `name`."""
        spent = self.phases.setdefault(name, Spent())
        token = _current.set((self, name))
        started = time.perf_counter()
        try:
            yield spent
        finally:
            spent.seconds += time.perf_counter() - started
            _current.reset(token)

    def total(self) -> Spent:
        total = Spent()
        for spent in self.phases.values():
            total.add(spent)
        return total

    def to_dict(self) -> dict:
        return {"phases": {name: spent.to_dict() for name, spent in self.phases.items()},
                "total": self.total().to_dict()}


def count(kind: str, samples: int) -> None:
    """Charge `samples` of `kind` to the current ledger's current phase (nothing when none is current)."""
    current = _current.get()
    if current is not None:
        ledger, name = current
        spent = ledger.phases[name]
        setattr(spent, kind, getattr(spent, kind) + samples)
