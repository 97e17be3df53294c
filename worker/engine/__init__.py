"""The compression engine: plain torch code, no web, database or queue imports.

Names are loaded on first use, so that the torch-free parts (spec, catalogue, errors, paths) can be
imported by the API without loading torch.
"""

from importlib import import_module

_EXPORTS = {
    "Budget": ".search", "Cancelled": ".errors", "CompressOptions": ".pipeline", "DataOptions": ".data",
    "InputError": ".errors", "LatencyOptions": ".latency", "Plan": ".plan", "Progress": ".pipeline",
    "Report": ".report", "SensitivityOptions": ".sensitivity", "apply_plan": ".kernels", "compress": ".pipeline",
    "load_artifact": ".artifact", "render": ".report", "save_artifact": ".artifact",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
