"""ONNX export of a plan, quantized by onnxruntime's own tooling and verified in onnxruntime.

The float model is exported once (`torch.onnx.export`, the adapter's inputs and output, a dynamic batch);
onnxruntime's quantizer then makes exactly the plan's low-precision layers int8: dynamic quantization for
Linear-only models (the x86 dynamic backend's counterpart), static QDQ with the job's calibration batches for
conv nets (the FX static backend's). Both files are loaded in onnxruntime and measured there with the job's
metric, batch and inputs, so the reported speed-up is the one a deployment gets, not torch's.
"""

from __future__ import annotations

import ast
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import onnx
import onnxruntime
from onnx import numpy_helper
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from . import cost
from .evaluation import Evaluator
from .latency import paired
from .plan import Plan

OPSET = 18
PROTOBUF_LIMIT_BYTES = 2**31 - 2**26  # below 2 GiB, with room for the graph itself
FLOAT_FILE = "model.float.onnx"
QUANTIZED_FILE = "model.onnx"
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")  # where a Linear or Conv2d's weight lands in the graph
ELEMENTWISE = ("Relu", "Clip", "Add")  # onnxruntime fuses these into the int8 kernels around them
LAYER_CALLS = {"aten.linear.default", "aten.conv2d.default"}
SCOPES, CALLS = "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"
# What each mode of onnxruntime's quantizer does; a torch backend names its counterpart
# (`Backend.onnx_quantization`): dynamic for the dynamic int8 Linear kernels, static QDQ for static int8.
QUANTIZATION = {
    "dynamic": "onnxruntime.quantization.quantize_dynamic: per-channel int8 weights, activations quantized per "
               "call (uint8)",
    "static": "onnxruntime.quantization.quantize_static, QDQ: per-channel int8 weights, uint8 activations with "
              "ranges from the job's calibration batches",
}


class ExportError(Exception):
    """Why this model or plan has no ONNX export; the job still succeeds with its torch artifact."""


@dataclass
class Runtime:
    """One ONNX file in onnxruntime, measured like the torch models were."""

    metric: float
    test_metric: float
    latency_ms: float  # median per batch, from interleaved rounds
    size_bytes: int


@dataclass
class OnnxExport:
    file: str  # relative to the job's output folder
    float_file: str
    float: Runtime
    quantized: Runtime
    latency_reduction: float  # of the quantized file against the float file, both in onnxruntime
    latency_interval: dict  # the same as a median over paired rounds with its order-statistic interval
    int8_layers: int
    quantization: str
    opset: int = OPSET
    runtime: dict = field(default_factory=dict)
    export_seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        # The figures a caller reads first: the deployable file's own.
        data.update(metric=self.quantized.metric, test_metric=self.quantized.test_metric,
                    latency_ms={"float": self.float.latency_ms, "quantized": self.quantized.latency_ms},
                    size_bytes=self.quantized.size_bytes, error=None)
        return data


def export_float(model: torch.nn.Module, names: list[str], example: tuple[torch.Tensor, ...], path: Path) -> None:
    """The float baseline (BatchNorm already folded where the backend folds it) with the adapter's inputs and
    one output, batch size left free."""
    from torch.export import Dim

    batch = Dim("batch")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, example, str(path), input_names=names, output_names=["output"],
                      dynamic_shapes={name: {0: batch} for name in names}, opset_version=OPSET, dynamo=True,
                      external_data=external_data(model), verbose=False)


def external_data(model: torch.nn.Module) -> bool:
    """One self-contained file unless protobuf's 2 GiB limit forces the weights into a side file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT_BYTES


def layer_nodes(graph, layers: list[str]) -> dict[str, str]:
    """Layer name -> the ONNX node holding its weight, read from the scope metadata the exporter writes on
    every node: the module path it came from (the deepest one that is a layer: a fused Conv+ReLU keeps its
    conv one level down) and the call it lowers. Each layer has exactly one such node."""
    wanted = set(layers)
    nodes: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        metadata = {prop.key: prop.value for prop in node.metadata_props}
        scopes, calls = ast.literal_eval(metadata.get(SCOPES, "[]")), ast.literal_eval(metadata.get(CALLS, "[]"))
        owner = next((scope for scope in reversed(scopes) if scope in wanted), None)
        if owner is not None and calls and calls[-1] in LAYER_CALLS:
            nodes.setdefault(owner, []).append(node.name)
    ambiguous = sorted(name for name, found in nodes.items() if len(found) != 1)
    if ambiguous:
        raise ExportError(f"layers exported as more than one weight node: {ambiguous[:3]}")
    return {name: found[0] for name, found in nodes.items()}


class _Calibration(CalibrationDataReader):
    """The job's calibration batches, as onnxruntime's static quantizer reads them."""

    def __init__(self, names: list[str], batches: list[tuple[torch.Tensor, ...]]):
        self.batches = [_feeds(names, batch) for batch in batches]
        self.rewind()

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):
        self.feeds = iter(self.batches)


def with_elementwise(graph, low_nodes: list[str]) -> list[str]:
    """The low layers' nodes plus the element-wise ops whose every computed input comes from one of them (or
    from such an op): as the FX backend does, an activation or residual add runs in int8 only where its
    inputs already are, so a float layer's neighbourhood stays float."""
    chosen = set(low_nodes)
    produced_by = {output: node for node in graph.node for output in node.output}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type not in ELEMENTWISE:
            continue
        computed = [produced_by[name] for name in node.input if name in produced_by
                    and produced_by[name].op_type != "Constant"]
        if computed and all(source.name in chosen for source in computed):
            chosen.add(node.name)
    return [node.name for node in graph.node if node.name in chosen]


def corrected(float_path: Path, nodes: dict[str, str], corrections: dict[str, torch.Tensor], large: bool) -> Path:
    """A copy of the float file whose corrected layers (their ONNX node: `nodes`) carry the bias the torch
    backend gives them in int8 (FxStaticInt8.fit), so that onnxruntime quantizes the same model."""
    model = onnx.load(str(float_path))
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    for layer, shift in corrections.items():
        node = by_name[nodes[layer]]
        if len(node.input) > 2 and node.input[2] in initializers:
            bias = initializers[node.input[2]]
            bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) - shift.cpu().numpy(), bias.name))
    path = float_path.with_name(float_path.stem + ".corrected.onnx")
    onnx.save(model, str(path), save_as_external_data=large)
    return path


def quantize(float_path: Path, path: Path, plan: Plan, graph, names: list[str],
             calibration: list[tuple[torch.Tensor, ...]], mode: str | None, large: bool = False,
             bias_corrections: dict[str, torch.Tensor] | None = None) -> int:
    """Quantize exactly the plan's low-precision layers of the float file (whose graph is `graph`) in `mode`
    (QUANTIZATION); the others go in `nodes_to_exclude`; the plan's int8 layers take their `bias_corrections`.
    Returns how many nodes were quantized."""
    nodes = layer_nodes(graph, list(plan.layers))
    low, kept = plan.low_precision_layers, [n for n, p in plan.layers.items() if p == plan.baseline_precision]
    missing = [name for name in low if name not in nodes]
    if missing:
        raise ExportError(f"no ONNX node found for layers {missing[:3]}")
    if mode not in QUANTIZATION:
        raise ExportError(f"onnxruntime's quantizer has no counterpart of the {plan.backend} backend")
    low_nodes = [nodes[n] for n in low]
    common = dict(nodes_to_exclude=[nodes[n] for n in kept if n in nodes], per_channel=True,
                  weight_type=QuantType.QInt8, use_external_data_format=large)
    shifts = {name: shift for name, shift in (bias_corrections or {}).items() if name in set(low)}
    source = corrected(float_path, nodes, shifts, large) if shifts else float_path
    try:
        if mode == "dynamic":
            quantize_dynamic(source, path, nodes_to_quantize=low_nodes, op_types_to_quantize=list(WEIGHT_OPS),
                             **common)
        else:
            quantize_static(source, path, _Calibration(names, calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, nodes_to_quantize=with_elementwise(graph, low_nodes),
                            op_types_to_quantize=list(WEIGHT_OPS + ELEMENTWISE), **common)
            cost.count("forward", sum(len(batch[0]) for batch in calibration))  # its calibration runs
    except Exception as exc:  # e.g. a 16-bit graph from a GPU job, which these quantizers do not take
        raise ExportError(f"onnxruntime's quantizer failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    finally:
        if source != float_path:
            for file in source.parent.glob(source.name + "*"):
                file.unlink()
    return len(low)


def _feeds(names: list[str], batch: tuple[torch.Tensor, ...]) -> dict:
    return {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, batch)}


class OrtModel:
    """An onnxruntime session behind the adapter's call signature, so the job's Evaluator scores it."""

    def __init__(self, path: Path | bytes, names: list[str], providers: list[str], threads: int):
        """`path`: an ONNX file, or a serialised model."""
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle threads would spin on their cores while the other session of a timed pair runs (halving its
        # speed here); a deployment serving one session loses little without spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                                    providers=providers)
        self.names = names
        self.size_bytes = len(path) if isinstance(path, bytes) else sum(
            f.stat().st_size for f in path.parent.glob(path.name + "*"))  # with any external data file

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, _feeds(self.names, inputs))[0]).to(inputs[0].device)


def providers(device: str) -> list[str]:
    """The providers a worker on this device deploys with, best first: TensorRT, then CUDA where the job ran
    on a GPU and this onnxruntime build has them; the CPU always last."""
    available = onnxruntime.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.startswith("cuda") else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def export(model: torch.nn.Module, names: list[str], plan: Plan, evaluator: Evaluator,
           calibration: list[tuple[torch.Tensor, ...]], out_dir: Path, device: str, rounds: int, mode: str | None,
           bias_corrections: dict[str, torch.Tensor] | None = None) -> OnnxExport:
    """Export the float baseline `model`, quantize the plan's layers, load both files in onnxruntime and
    measure them on the job's splits and batch."""
    started = time.perf_counter()
    float_path, path = out_dir / FLOAT_FILE, out_dir / QUANTIZED_FILE
    try:
        export_float(model, names, calibration[0], float_path)
    except Exception as exc:  # the exporter cannot lower every model; the error says which part
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    graph = onnx.load(str(float_path), load_external_data=False).graph
    int8 = quantize(float_path, path, plan, graph, names, calibration, mode, large=external_data(model),
                    bias_corrections=bias_corrections)
    chosen = providers(device)
    try:
        measured, interval = _measure(float_path, path, names, chosen, evaluator, calibration[0], rounds)
    except Exception as exc:  # e.g. an operator this onnxruntime build has no kernel for on this provider
        raise ExportError(f"onnxruntime could not run the exported files: {type(exc).__name__}: "
                          f"{str(exc)[:300]}") from None
    return OnnxExport(
        file=str(path.relative_to(out_dir.parent)), float_file=str(float_path.relative_to(out_dir.parent)),
        float=measured[0], quantized=measured[1],
        latency_reduction=1 - measured[1].latency_ms / measured[0].latency_ms, latency_interval=interval,
        int8_layers=int8,
        quantization=QUANTIZATION[mode],
        runtime={"onnxruntime": onnxruntime.__version__, "onnx": version("onnx"), "providers": chosen[:1]},
        export_seconds=round(time.perf_counter() - started, 3))


def _measure(float_path: Path, path: Path, names: list[str], chosen: list[str], evaluator: Evaluator,
             example: tuple[torch.Tensor, ...], rounds: int) -> tuple[tuple[Runtime, Runtime], dict]:
    """Both files in onnxruntime: timed in interleaved rounds (with the reduction's interval), then scored on
    both splits."""
    threads = torch.get_num_threads()
    float_model, quantized = (OrtModel(p, names, chosen, threads) for p in (float_path, path))
    timing = paired(lambda: float_model(*example), lambda: quantized(*example), rounds=rounds, inner=1,
                    samples=len(example[0]))

    def runtime(model: OrtModel, file: Path, latency: float) -> Runtime:
        size = sum(f.stat().st_size for f in file.parent.glob(file.name + "*"))  # with any external data file
        return Runtime(metric=evaluator.metric(model), test_metric=evaluator.metric(model, "test"),
                       latency_ms=latency, size_bytes=size)

    return ((runtime(float_model, float_path, timing.first_ms), runtime(quantized, path, timing.second_ms)),
            timing.reduction().to_dict())
