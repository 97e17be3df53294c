"""Knowing the machine: hardware detection, the measured format menu (its decisions tested on stubbed
probes of an AVX2 and an AMX machine, so no test depends on the CPU that runs it), and the weight-only kernels'
simulation, exact to the kernel in both activation dtypes."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from worker.engine import hardware
from worker.engine.kernels import menu as menu_module
from worker.engine.kernels.linear_formats import (FORMATS, FormatSimulation, Int4WeightOnlyLinear,
                                                  Int8WeightOnlyLinear, bf16_round, low_module, simulated_weights)
from worker.engine.kernels.menu import Menu, Probe, load_or_measure

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma f16c avx2 bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
"""
XEON = EPYC.replace("AuthenticAMD", "GenuineIntel").replace("25", "6").replace(": 1\n", ": 167\n", 1).replace(
    "AMD EPYC", "Intel(R) Xeon(R)").replace("bmi2", "avx512f avx512bw avx512vl avx512_vnni avx512_bf16 "
                                                    "avx512_fp16 amx_tile amx_bf16 amx_int8")


def _machine(tmp_path: Path, text: str) -> hardware.Hardware:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return hardware.detect("cpu", path)


def test_detection_reads_the_first_processor_and_the_flags_that_decide_kernels(tmp_path):
    epyc, xeon = _machine(tmp_path, EPYC), _machine(tmp_path, XEON)
    assert (epyc.vendor, epyc.model_name, epyc.family, epyc.model) == ("AuthenticAMD", "AMD EPYC", "25", "1")
    assert epyc.flags == ("avx2", "fma", "f16c") and not epyc.native_bf16
    assert {"avx512_bf16", "amx_bf16", "amx_int8"} <= set(xeon.flags) and xeon.native_bf16
    assert xeon.model == "167" and "Xeon" in xeon.describe()
    # A profile or menu measured on one is never reused on the other.
    assert epyc.key != xeon.key
    assert json.loads(json.dumps(epyc.to_dict()))["key"] == epyc.key


def test_this_machine_is_described_with_torchs_own_capability():
    here = hardware.detect()
    assert here.kind == "cpu" and here.capability == str(torch.backends.cpu.get_cpu_capability())
    assert here.threads == torch.get_num_threads()


def _probe(name, fp32, ms):
    return Probe(name, {1: fp32[0], 256: fp32[1]}, {1: ms[0], 256: ms[1]},
                 {1: ms[0] < fp32[0], 256: ms[1] < fp32[1]})


# Probe figures as measured (ms per call at 1 and 256 rows): an AVX2 EPYC (2026-12-05) and an AMX Xeon
# (2026-12-04); on both, fp32 activations send the weight-only kernels down a slow reference path.
AVX2 = {"bf16": ((0.13, 3.1), (0.11, 24.4)), "fp16": ((0.10, 3.1), (0.09, 20.4)), "int8": ((0.17, 3.0), (0.26, 1.8)),
        "int8wo/fp32": ((0.10, 3.2), (0.47, 114)), "int8wo/bf16": ((0.14, 3.1), (0.10, 6.1)),
        "int4wo/fp32": ((0.13, 3.8), (0.91, 231)), "int4wo/bf16": ((0.12, 3.2), (0.11, 6.0))}
AMX = {"bf16": ((0.05, 0.79), (0.04, 0.20)), "fp16": ((0.05, 0.79), (0.05, 0.6)), "int8": ((0.05, 0.79), (0.06, 0.2)),
       "int8wo/fp32": ((0.05, 0.8), (0.30, 9.0)), "int8wo/bf16": ((0.05, 0.8), (0.031, 0.5)),
       "int4wo/fp32": ((0.05, 0.8), (0.77, 20)), "int4wo/bf16": ((0.05, 0.8), (0.044, 0.6))}


@pytest.mark.parametrize("figures, floats, activations", [(AVX2, (), "bf16"), (AMX, ("bf16", "fp16"), "bf16")])
def test_the_menu_follows_the_measurements(monkeypatch, tmp_path, figures, floats, activations):
    monkeypatch.setattr(menu_module, "_probe", lambda name, _call, _linear: _probe(name, *figures[name]))
    menu = menu_module.measure(_machine(tmp_path, EPYC))
    assert menu.floats == floats and menu.weight_only_activations == activations
    if not floats:  # AVX2: today's menu, fp32 the baseline, and the report says why bf16 is not offered
        assert menu.fastest_float == "fp32" and menu.formats_for(("int8",)) == ("int8",)
        assert menu.reasons["bf16"].startswith("not offered") and "24.400" in menu.reasons["bf16"]
    else:  # AMX: bf16 is the fastest float, a per-layer format and the baseline to beat
        assert menu.fastest_float == "bf16" and menu.formats_for(("int8",)) == ("int8", "bf16")
        assert menu.formats_for(("int8", "int8wo", "int4wo")) == ("int8", "int8wo", "int4wo", "bf16")


def test_weight_only_activations_stay_fp32_where_bf16_is_not_faster(monkeypatch, tmp_path):
    slow_bf16 = {**AVX2, "int8wo/bf16": ((0.1, 3.0), (0.9, 30)), "int4wo/bf16": ((0.1, 3.0), (0.9, 30)),
                 "int8wo/fp32": ((0.1, 3.0), (0.2, 4)), "int4wo/fp32": ((0.1, 3.0), (0.2, 4))}
    monkeypatch.setattr(menu_module, "_probe", lambda name, _call, _linear: _probe(name, *slow_bf16[name]))
    assert menu_module.measure(_machine(tmp_path, EPYC)).weight_only_activations == "fp32"


def test_the_menu_is_measured_once_per_hardware(monkeypatch, tmp_path):
    calls = []

    def measured(machine):
        calls.append(machine.key)
        return Menu(machine.key, (), "fp32", {"bf16": "stub"})

    monkeypatch.setattr(menu_module, "measure", measured)
    epyc, xeon = _machine(tmp_path, EPYC), _machine(tmp_path, XEON)
    assert load_or_measure(epyc, tmp_path).hardware_key == epyc.key
    assert load_or_measure(epyc, tmp_path).hardware_key == epyc.key
    assert load_or_measure(xeon, tmp_path).hardware_key == xeon.key
    assert calls == [epyc.key, xeon.key]


def test_a_real_probe_decides_every_format_with_a_reason(tmp_path):
    menu = load_or_measure(hardware.detect(), tmp_path)
    assert set(menu.reasons) == {"bf16", "fp16", "int8", "int8wo", "int4wo"}
    assert menu.weight_only_activations in ("fp32", "bf16")
    assert set(menu.floats) <= {"bf16", "fp16"}


def _kernel_weights(module: nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights the kernel multiplies by, read exactly: the identity as input makes each output one weight."""
    eye = torch.eye(in_features)
    with torch.inference_mode():
        out = module(eye) - (0 if module.bias is None else module.bias)
    return out.T.to(dtype)


@pytest.mark.parametrize("activations", ["fp32", "bf16"])
@pytest.mark.parametrize("precision, kernel", [("int8wo", Int8WeightOnlyLinear), ("int4wo", Int4WeightOnlyLinear)])
def test_the_simulated_weights_are_the_kernels_bit_for_bit(precision, kernel, activations):
    """One differing code anywhere fails this: every weight is compared exactly (with bf16 activations the kernel's
    output, and so what the identity reads, is the weight rounded to bf16)."""
    if activations == "bf16" and not _bf16_weight_only_runs():
        pytest.skip("this CPU build has no bf16 weight-only kernel")
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[activations]
    module = kernel(linear, dtype)
    simulated = simulated_weights(activations)[precision](linear.weight.detach())
    read = bf16_round(simulated) if activations == "bf16" else simulated
    assert torch.equal(_kernel_weights(module, 128, torch.float32), read)


def _bf16_weight_only_runs() -> bool:
    try:
        Int8WeightOnlyLinear(nn.Linear(32, 16), torch.bfloat16)(torch.randn(1, 32))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("precision", [f for f in FORMATS if f != "int8"])  # int8's kernel takes fp32: test_kernels
def test_bf16_kernels_are_reproduced_to_one_rounding(precision):
    """With bf16 activations the simulation rounds where the kernel does; what is left is the order of the
    kernel's fp32 accumulation, at most one bf16 rounding step of each output."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 64)
    module = low_module(linear, precision, torch.bfloat16)
    simulation = FormatSimulation(nn.Sequential(linear), {f"0@{precision}": linear}, "bf16")
    with torch.inference_mode():
        real = module(x)
        simulated = simulation._output(f"0@{precision}", linear, x)
        exact = linear(x)
    # One bf16 step of what is rounded: the product, before a weight-only module adds its fp32 bias.
    rounded = exact - linear.bias if precision in ("int8wo", "int4wo") else exact
    ulp = rounded.abs().clamp(min=1e-3) * 2 ** -7
    assert ((real - simulated).abs() <= ulp).all()
    assert not torch.allclose(real, exact, atol=1e-6)  # the rounding is visible: an fp32 simulation would not match
