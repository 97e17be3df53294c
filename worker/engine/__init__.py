"""The compression engine: plain torch code, no web, database or queue imports."""

from .data import DataOptions
from .errors import Cancelled, InputError
from .latency import LatencyOptions
from .pipeline import CompressOptions, Progress, compress
from .plan import Plan
from .quantize import apply_plan, load_artifact, save_artifact
from .report import read_report, render
from .search import Budget
from .sensitivity import SensitivityOptions

__all__ = [
    "Budget", "Cancelled", "CompressOptions", "DataOptions", "InputError", "LatencyOptions", "Plan", "Progress",
    "SensitivityOptions", "apply_plan", "compress", "load_artifact", "read_report", "render", "save_artifact",
]
