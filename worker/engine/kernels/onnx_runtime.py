"""`onnxruntime-dynamic-int8` / `onnxruntime-static-int8`: the search in the runtime the user deploys
(`--runtime onnxruntime`). The float model is exported to ONNX once; every plan is that file quantized on exactly
its int8 layers by onnxruntime's own quantizer (dynamic for Linear-only models, static QDQ with per-tensor
activations for conv nets) and run in onnxruntime: every evaluation, every timing and the delivered file are
onnxruntime's. The sensitivity analysis keeps the torch backend's simulation (8-bit activations per call, as
onnxruntime's dynamic quantization does; the static graph's fake-quant edges), whose ranking
bench/simulation.py checks against the damage each layer does alone in onnxruntime."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import onnx
import torch

from .. import export
from ..latency import paired
from ..plan import Plan
from .base import Backend, Candidates, Inputs, Simulation
from .profile import LatencyProfile, leave_one_out
from .registry import register

RUNTIME = "onnxruntime"


@register
class OnnxRuntimeInt8(Backend):
    priority = 40  # asked first: only a job for onnxruntime takes it

    @classmethod
    def create(cls, offered: Candidates) -> "OnnxRuntimeInt8 | None":
        if offered.runtime != RUNTIME or not offered.int8_only:
            return None
        from .registry import BACKENDS

        torch_backend = None
        for backend in BACKENDS:  # the torch backend this model would get: its candidates, graph and simulation
            if backend is not cls and (torch_backend := backend.create(offered)) is not None:
                break
        mode = torch_backend.onnx_quantization
        if mode is None:
            return None
        return cls(f"{RUNTIME}-{mode}-int8", f"onnxruntime's {export.QUANTIZATION[mode]}; every plan measured in "
                   f"onnxruntime", offered.adapter, torch_backend.candidates, torch_backend.baseline,
                   torch_backend.skipped, torch_backend.fallback, torch_backend=torch_backend, mode=mode,
                   device=offered.device)

    def __init__(self, *fields, torch_backend: Backend, mode: str, device: str, **named):
        super().__init__(*fields, **named)
        self.torch, self.mode, self.device = torch_backend, mode, device
        self.folder = Path(tempfile.mkdtemp(prefix="mixq-onnx-"))
        # Removed when the backend is collected or at exit (a __del__ at exit can outlive the shutil module).
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.float_path = self.folder / export.FLOAT_FILE
        self.names = list(self.adapter.input_names)
        self.files: dict[frozenset, Path] = {}

    @property
    def onnx_quantization(self) -> str:
        return self.mode

    def fit(self, calibration: list[Inputs]) -> None:
        """The torch backend's fit (static int8: its bias corrections, carried into the quantized files), then
        the float model exported once, which becomes the baseline every plan is measured against."""
        self.torch.fit(calibration)
        self.corrections = self.torch.corrections
        self.calibration = calibration
        try:
            export.export_float(self.torch.baseline, self.names, calibration[0], self.float_path)
        except Exception as exc:  # the exporter cannot lower every model; say which part
            from ..errors import InputError

            raise InputError(f"--runtime onnxruntime needs an ONNX export, and torch.onnx.export failed: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
        self.graph = onnx.load(str(self.float_path), load_external_data=False).graph
        self.baseline = self._session(self.float_path)

    def _session(self, path: Path) -> export.OrtModel:
        return export.OrtModel(path, self.names, export.providers(self.device), torch.get_num_threads())

    def file(self, low: list[str]) -> Path:
        """The float file quantized on exactly `low`, made once per set of layers."""
        key = frozenset(low)
        if key not in self.files:
            path = self.folder / f"plan-{len(self.files)}.onnx"
            plan = Plan(layers={n: "int8" if n in key else "fp32" for n in self.candidates}, backend=self.name)
            export.quantize(self.float_path, path, plan, self.graph, self.names, self.calibration, self.mode,
                            large=export.external_data(self.torch.baseline), bias_corrections=self.corrections)
            self.files[key] = path
        return self.files[key]

    def build(self, plan: Plan, calibration: list[Inputs]) -> export.OrtModel:
        low = plan.low_precision_layers
        return self._session(self.file(low)) if low else self.baseline

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        return self.torch.simulation(calibration)

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5, workload=None) -> LatencyProfile:
        """Each layer timed in context in onnxruntime: the all-int8 file against the one with that layer alone
        left float (a float island between onnxruntime's quantize and dequantize nodes). `workload` is
        ignored: these backends serve no generation model, so it is always the example batch."""
        example, everything = calibration[0], list(self.candidates)
        all_low = self.build(self.all_low(), calibration)

        def pair(name: str, rounds: int):
            island = self._session(self.file([n for n in everything if n != name]))
            return paired(lambda: island(*example), lambda: all_low(*example), rounds=rounds, inner=1,
                          samples=len(example[0]))

        return leave_one_out(self.baseline, all_low, example, everything, seconds_per_layer,
                             "leave-one-out in onnxruntime: the all-int8 file against the file with that layer float",
                             pair)

    def deliver(self, plan: Plan, folder: Path) -> dict[str, Path]:
        """The plan's files in `folder`: the quantized model (the file every figure was measured on) and the
        float one."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {"float": folder / export.FLOAT_FILE}
        shutil.copy(self.float_path, files["float"])
        if plan.low_precision_layers:
            files["onnx"] = folder / export.QUANTIZED_FILE
            shutil.copy(self.file(plan.low_precision_layers), files["onnx"])
        plan.save(folder / "plan.json")
        files["plan"] = folder / "plan.json"
        return files
