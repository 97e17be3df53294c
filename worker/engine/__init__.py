"""The compression engine: plain torch code, no web, database or queue imports."""

from .artifact import load_artifact, save_artifact
from .data import DataOptions
from .errors import Cancelled, InputError
from .kernels import apply_plan
from .latency import LatencyOptions
from .pipeline import CompressOptions, Progress, compress
from .plan import Plan
from .report import Report, render
from .search import Budget
from .sensitivity import SensitivityOptions

__all__ = [
    "Budget", "Cancelled", "CompressOptions", "DataOptions", "InputError", "LatencyOptions", "Plan", "Progress",
    "Report", "SensitivityOptions", "apply_plan", "compress", "load_artifact", "render", "save_artifact",
]
