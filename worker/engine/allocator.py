"""The process's memory allocator: keep freed activations instead of handing them back to the OS.

glibc returns large blocks (over 32 MB: a conv net's activations at batch 8) to the OS on free and
page-faults them back in on the next forward. Once its heap has fragmented, which building a few dozen
quantized models in one process does, every forward pays that: here, 3x the latency of EfficientNet-Lite0,
in system time. With mmap off, no trimming and one arena, freed memory is reused and latencies stay put;
the price is that the process keeps its peak memory. The setting must be in the environment when the
process starts, so `mixq` re-executes itself with it.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1"


def configured() -> bool:
    return TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def description() -> str:
    if configured():
        return f"glibc, GLIBC_TUNABLES={TUNABLES}"
    return "glibc defaults (run through the mixq command for steady latencies)"


def environment() -> dict[str, str]:
    """The current environment with the tunables added."""
    existing = os.environ.get("GLIBC_TUNABLES")
    return {**os.environ, "GLIBC_TUNABLES": f"{existing}:{TUNABLES}" if existing else TUNABLES}


def reexec(module_args: list[str]) -> None:
    """Replace this process with `python <module_args>` under the tunables, unless already so (or not glibc)."""
    if configured() or platform.libc_ver()[0] != "glibc":
        return
    os.execve(sys.executable, [sys.executable, *module_args], environment())
