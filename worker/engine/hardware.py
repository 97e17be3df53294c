"""The machine a measurement ran on: CPU vendor, model and the instruction sets that decide which kernels are
fast (or the GPU), torch's dispatch capability and the thread count.

Machines differ between workers and sessions (an AVX2-only EPYC, a Xeon with AVX-512 bf16 and AMX): every
report and benchmark result records this, and anything measured on one machine (a latency profile, the
format menu) is keyed by `Hardware.key` so that it is never reused on another.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# The CPU flags that decide which of our kernels are fast: bf16/fp16 arithmetic, int8 dot products, AMX tiles.
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Hardware:
    kind: str  # "cpu" or "cuda"
    vendor: str
    model_name: str
    family: str
    model: str
    flags: tuple[str, ...]  # of FLAGS_OF_INTEREST, those present
    capability: str  # torch's CPU dispatch level (DEFAULT, AVX2, AVX512, ...) or the GPU's compute capability
    threads: int
    gpu: str | None = None
    machine: str = field(default_factory=platform.machine)

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU has bf16 arithmetic (AVX-512 bf16 or AMX); a GPU always has 16-bit floats."""
        return self.kind == "cuda" or bool({"avx512_bf16", "amx_bf16"} & set(self.flags))

    @property
    def key(self) -> str:
        """Identifies the hardware and its dispatch (not the thread count's effect on nothing else): measurements
        keyed by it are reused only on the same kind of machine, with the same threads."""
        identity = [self.kind, self.vendor, self.model_name, self.family, self.model, list(self.flags),
                    self.capability, self.threads, self.gpu]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for a report, a results header or the dashboard."""
        if self.kind == "cuda":
            return f"{self.gpu} (compute capability {self.capability}); host {self.model_name}"
        isa = ", ".join(self.flags) or "no AVX2"
        return (f"{self.model_name} ({self.vendor}, family {self.family} model {self.model}), torch dispatch "
                f"{self.capability}, {self.threads} threads; {isa}")

    def to_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags), "key": self.key, "native_bf16": self.native_bf16,
                "description": self.describe()}


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        return "unknown"


def detect(device: str = "cpu", cpuinfo: Path = Path("/proc/cpuinfo")) -> Hardware:
    info = _cpuinfo(cpuinfo)
    present = set(info.get("flags", "").split())
    cpu = dict(vendor=info.get("vendor_id", platform.processor() or "unknown"),
               model_name=info.get("model name", platform.processor() or platform.machine()),
               family=info.get("cpu family", "?"), model=info.get("model", "?"),
               flags=tuple(f for f in FLAGS_OF_INTEREST if f in present), threads=torch.get_num_threads())
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return Hardware(kind="cuda", capability=f"{major}.{minor}", gpu=torch.cuda.get_device_name(index), **cpu)
    return Hardware(kind="cpu", capability=cpu_capability(), **cpu)
