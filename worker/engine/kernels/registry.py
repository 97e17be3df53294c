"""The kernel backends by priority, each registered by its own module (as torchao registers a handler per
config with `register_quantize_module_handler`): adding a backend is adding one module to this package."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Backend

BACKENDS: list[type["Backend"]] = []


def register(cls: type["Backend"]) -> type["Backend"]:
    """Class decorator: `cls.create(offered)` is asked, in descending `priority`, whether it takes a model."""
    BACKENDS.append(cls)
    BACKENDS.sort(key=lambda backend: -backend.priority)
    return cls
