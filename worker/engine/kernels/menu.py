"""Which formats this worker offers, decided by measuring its own kernels, not by a table.

A short probe times each candidate format against fp32 on one Linear shape at one input row (a decoding step)
and at many (a batch or a prefill), paired and interleaved. The answer is cached per hardware
(`Hardware.key`), so a worker probes once; a different CPU probes again. What it decides:

- whether 16-bit floats (bf16, fp16) are native here: offered as a per-layer format and as a whole-model float
  baseline only when faster than fp32 at some size (on an AVX2-only CPU bf16 is emulated and several times
  slower; with AVX-512 bf16 or AMX it is the fastest float);
- the activation dtype of the weight-only kernels (int8wo, int4wo): bf16 where the bf16 call is faster
  (torch's CPU weight-only kernels take a slow reference path with fp32 activations on AVX-512/AMX CPUs);
- each integer format's figures and why it is offered. Integer formats the task asks for are always offered:
  a format slower on the probe's shape may be faster on another, and the per-layer profile decides per shape.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import Hardware
from ..latency import paired

log = logging.getLogger("mixq.menu")

MENU_FORMAT = "mixq.menu/1"
FLOATS = ("bf16", "fp16")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# One transformer MLP projection (SmolLM2's up projection: 576 -> 1536); rows: a decoding step, a batch.
PROBE_SHAPE = (576, 1536)
PROBE_ROWS = (1, 256)
PROBE_ROUNDS = 9
SCREEN = 2.0


@dataclass
class Probe:
    """One format against fp32 at each probed row count: ms per call and whether the paired interval says
    faster."""

    format: str
    fp32_ms: dict[int, float]
    ms: dict[int, float]
    faster: dict[int, bool]

    def summary(self) -> str:
        return "; ".join(f"{rows} row(s) {self.ms[rows]:.3f} vs {self.fp32_ms[rows]:.3f} ms fp32" for rows in self.ms)


@dataclass
class Menu:
    """What the probe decided for one hardware: offered 16-bit floats, the weight-only activation dtype, and
    every probe's figures with a reason."""

    hardware_key: str
    floats: tuple[str, ...]  # native 16-bit floats, fastest first (empty: fp32 is this worker's fastest float)
    weight_only_activations: str  # "bf16" or "fp32"
    reasons: dict[str, str]
    probes: dict[str, dict] = field(default_factory=dict)
    format: str = MENU_FORMAT

    @property
    def fastest_float(self) -> str:
        return self.floats[0] if self.floats else "fp32"

    def formats_for(self, asked: tuple[str, ...]) -> tuple[str, ...]:
        """The per-layer formats a task's default menu becomes here: its integer formats, plus bf16 where
        native (a 16-bit step between float and int8)."""
        return (*asked, "bf16") if "bf16" in self.floats and "bf16" not in asked else tuple(asked)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Menu":
        if data.get("format") != MENU_FORMAT:
            raise ValueError("not a menu")
        return cls(**{**data, "floats": tuple(data["floats"])})


def _once_ms(call) -> float:
    call()  # warm (first calls pack weights, allocate)
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def _time(fp32_call, call) -> tuple[float, float, bool]:
    """The candidate against fp32 in paired rounds; a candidate over SCREEN times slower on one call is not
    timed further (an emulated bf16 matmul at 256 rows takes 8x fp32's time on an AVX2 CPU: rounds would
    only confirm it, at seconds each)."""
    fp32_ms, ms = _once_ms(fp32_call), _once_ms(call)
    if ms > SCREEN * fp32_ms:
        return fp32_ms, ms, False
    timing = paired(fp32_call, call, rounds=PROBE_ROUNDS, inner=3, warmup=1)
    return timing.first_ms, timing.second_ms, timing.reduction().faster


def _probe(name: str, make_call, linear: nn.Linear) -> Probe:
    fp32_ms, ms, faster = {}, {}, {}
    for rows in PROBE_ROWS:
        x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(rows))
        fp32_ms[rows], ms[rows], faster[rows] = _time(lambda: linear(x), make_call(x))
    return Probe(name, fp32_ms, ms, faster)


def _float_call(linear: nn.Linear, dtype: torch.dtype):
    """A call of `linear` cast whole to `dtype` (weights and input converted once, outside the timing)."""
    weight, bias = linear.weight.to(dtype), linear.bias.to(dtype)

    def on(x: torch.Tensor):
        cast = x.to(dtype)
        return lambda: F.linear(cast, weight, bias)
    return on


def _module_call(module: nn.Module):
    return lambda x: (lambda: module(x))


@torch.inference_mode()
def measure(hardware: Hardware) -> Menu:
    """Probe this worker's kernels (a few seconds) and decide its menu."""
    from .linear_formats import low_module  # circular: linear_formats builds its modules from the menu's choice

    linear = nn.Linear(*PROBE_SHAPE).eval()
    probes: dict[str, Probe] = {}
    for name in FLOATS:
        try:
            probes[name] = _probe(name, _float_call(linear, FLOAT_DTYPES[name]), linear)
        except RuntimeError as exc:  # a dtype this build has no CPU matmul for
            log.info("no %s matmul here: %s", name, exc)
    probes["int8"] = _probe("int8", _module_call(low_module(linear, "int8")), linear)
    for precision in ("int8wo", "int4wo"):
        for activations in ("fp32", "bf16"):
            module = low_module(linear, precision, FLOAT_DTYPES[activations])
            probes[f"{precision}/{activations}"] = _probe(f"{precision}/{activations}", _module_call(module), linear)

    # A float is native where it beats fp32 on a batch: at one row a call is bound by reading the weights, and
    # half-size weights win there even where the arithmetic is emulated (AVX2: bf16 1.2x faster at 1 row, 8x
    # slower at 256).
    batch = PROBE_ROWS[-1]
    floats = sorted((f for f in FLOATS if f in probes and probes[f].faster[batch]), key=lambda f: probes[f].ms[batch])
    reasons = {f: (f"offered: faster than fp32 on a batch ({probes[f].summary()})" if f in floats else
                   f"not offered: not faster than fp32 on a batch of {batch} rows ({probes[f].summary()})"
                   if f in probes else "not offered: this torch has no CPU matmul for it") for f in FLOATS}
    # bf16 activations where they beat fp32 activations on the decode row, where weight-only kernels matter.
    decode = PROBE_ROWS[0]
    bf16_wins = all(probes[f"{p}/bf16"].ms[decode] < probes[f"{p}/fp32"].ms[decode] for p in ("int8wo", "int4wo"))
    activations = "bf16" if bf16_wins else "fp32"
    for precision in ("int8wo", "int4wo"):
        chosen = probes[f"{precision}/{activations}"]
        reasons[precision] = (f"offered with {activations} activations and scales ({chosen.summary()}; with the "
                              f"other activations {probes[precision + '/' + ('fp32' if bf16_wins else 'bf16')].summary()})")
    reasons["int8"] = f"offered: oneDNN dynamic int8 ({probes['int8'].summary()})"
    return Menu(hardware.key, tuple(floats), activations, reasons,
                {name: {"fp32_ms": p.fp32_ms, "ms": p.ms, "faster": p.faster} for name, p in probes.items()})


def load_or_measure(hardware: Hardware, cache_dir: Path | None) -> Menu:
    """The menu for this hardware, measured once and cached (a GPU's menu is not probed: it runs torchao)."""
    if hardware.kind != "cpu":
        return Menu(hardware.key, ("fp16",), "fp16", {"fp16": "a GPU's native float"})
    path = Path(cache_dir) / "menus" / f"{hardware.key}.json" if cache_dir else None
    if path and path.exists():
        try:
            return Menu.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring an unreadable menu cache %s", path)
    menu = measure(hardware)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(menu.to_dict(), indent=2))
    return menu
