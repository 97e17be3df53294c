"""The per-layer precision plan: one serialisable object shared by search, quantizer, report and artifact.

Like torchao's `FqnToConfig`, it is plain data mapping fully qualified module names to a precision;
`quantize.apply_plan` is the one verb that applies it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_FORMAT = "mixq.plan/1"
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
# The GGML types a llama.cpp plan gives a tensor (llamacpp.py), widest first.
GGML_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0")
# int8wo, int4wo: weight-only (kernels/linear_formats.py)
LOW_PRECISIONS = ("int8", "fp8", "int8wo", "int4wo", *GGML_TYPES)
WEIGHT_ONLY_ACTIVATIONS = ("fp32", "bf16")
FOLDED_GRAPH = "folded-graph"
CAST_OF = ("model", FOLDED_GRAPH)


@dataclass
class Plan:
    """Precision per quantizable layer, plus what is needed to rebuild the quantized model."""

    layers: dict[str, str]
    baseline_precision: str = "fp32"
    device: str = "cpu"
    backend: str = ""  # filled by apply_plan: which kernel path realised the plan
    source: str = ""
    revision: str = ""
    calibration: dict = field(default_factory=dict)  # how activation ranges were calibrated
    # The formats the plan chose among (its backend's): several for a plan that may mix them.
    choices: list[str] = field(default_factory=lambda: ["int8"])
    # The dtype the weight-only kernels ran their activations and scales in (the worker's format menu chose it).
    weight_only_activations: str = "fp32"
    # What a whole-model cast (backend "whole-cast") casts: the model as given, or, for a conv net, the graph its
    # plans and baseline run as (FOLDED_GRAPH: traced, BatchNorm folded, channels-last).
    cast_of: str = "model"

    def __post_init__(self) -> None:
        allowed = FLOAT_PRECISIONS + LOW_PRECISIONS
        bad = {name: p for name, p in self.layers.items() if p not in allowed}
        if bad:
            raise ValueError(f"unknown precision(s) {bad}; allowed: {', '.join(allowed)}")
        if self.weight_only_activations not in WEIGHT_ONLY_ACTIVATIONS:
            raise ValueError(f"weight_only_activations must be one of {', '.join(WEIGHT_ONLY_ACTIVATIONS)}")
        if self.cast_of not in CAST_OF:
            raise ValueError(f"cast_of must be one of {', '.join(CAST_OF)}")

    @classmethod
    def from_ordering(cls, ordering: list[str], k: int, low: str, **kwargs) -> "Plan":
        """The first k layers of `ordering` (least sensitive first) in `low` precision, the rest float."""
        baseline = kwargs.get("baseline_precision", "fp32")
        return cls(layers={name: (low if i < k else baseline) for i, name in enumerate(ordering)}, **kwargs)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.choices)

    @property
    def low_precision_layers(self) -> list[str]:
        """Layers below the baseline's precision: integer formats, and 16-bit floats under an fp32 baseline."""
        return [name for name, p in self.layers.items()
                if p in LOW_PRECISIONS or (p != self.baseline_precision and self.baseline_precision == "fp32")]

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a mixq plan (expected format {PLAN_FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        return cls(**fields)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))
