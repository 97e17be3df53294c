"""`llama.cpp-gguf`: the search in llama.cpp (`--runtime llama.cpp`), for causal language models read from a GGUF
file. A candidate is an item `layer@TYPE`, a GGML type for the layer's weight tensor; a plan is one GGUF file,
written by llama.cpp's own quantizer (one type per tensor) and run in llama.cpp: every evaluation, every timing and
the delivered file are llama.cpp's. The output head of a model with tied embeddings is the token embedding table
(`token_embd`), so its type is that table's, for the lookup and the head alike.

| step       | how                                                                                                |
|------------|----------------------------------------------------------------------------------------------------|
| baseline   | the source file with every tensor in F32: the weights the torch model was read from               |
| menu       | each type timed in llama.cpp on a file with every tensor it fits in that type, against the F32     |
|            | file (paired rounds of the job's workload); offered if it saves time beyond its noise and no wider |
|            | type saves as much (measured on this worker, this model: `menu` in the report)                     |
| profile    | each item's saving: its type's measured saving shared out by weight count (a decode step reads     |
|            | every weight once); the sum anchored to a whole-file timing of the fastest plan                    |
| simulation | torch, with each item's weight exactly as llama.cpp quantized it (read back from that type's file  |
|            | when asked for, with gguf-py and transformers' tensor processing, as the model itself was loaded)  |
|            | and its input rounded as llama.cpp rounds activations for that type's dot products (Q8_0/Q8_1     |
|            | blocks of 32 with fp16 scales, Q8_K blocks of 256, fp16 for F16); attention, norms and the rest    |
|            | stay fp32 in both; a tied head's type also swaps the embedding table the lookup reads, and the     |
|            | head's Hessian term adds the lookup output's (`probes`)                                            |
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import llamacpp
from ..latency import Paired, paired
from ..plan import Plan
from .base import Backend, Candidates, Inputs, Simulation, hooks, join_item, split_item, swapped_weights
from .profile import LatencyProfile, _anchored, fastest_items
from .registry import register

RUNTIME = "llama.cpp"
NAME = "llama.cpp-gguf"
# The 8-bit form llama.cpp gives a layer's input for each weight type's dot products (ggml's vec_dot_type).
ACTIVATION_BLOCKS = {"Q8_0": (32, True), "Q4_0": (32, True), "Q5_0": (32, True), "Q4_1": (32, True),
                     "Q5_1": (32, True), "Q4_K": (256, False), "Q5_K": (256, False), "Q6_K": (256, False)}
MENU_ROUNDS = 7
CACHE_BYTES = 1 << 30  # weights read back for the simulation: room for Gemma 3's 671 MB head beside the layers in use


def fake_activation(x: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """`x` as llama.cpp hands it to a dot product with weights of `ggml_type`: symmetric 8-bit codes per block
    along the features with the block's absolute maximum / 127 as scale (stored in fp16 for the 32-wide blocks), or
    fp16 values for F16 weights."""
    if ggml_type == "F16":
        return x.to(torch.float16).to(x.dtype)
    if ggml_type not in ACTIVATION_BLOCKS:
        return x
    block, half_scale = ACTIVATION_BLOCKS[ggml_type]
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, torch.round(blocks / scale.clamp(min=1e-30)), torch.zeros_like(blocks))
    stored = scale.half().float() if half_scale else scale
    return (codes * stored).reshape(x.shape).to(x.dtype)


def tensor_names(adapter: nn.Module, layers: Iterable[str], path: Path) -> dict[str, str]:
    """Each layer's tensor in the GGUF file at `path`: transformers' own GGUF name map (the one that loaded the
    model); a tied output head is the token embedding table."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    in_file = llamacpp.tensor_types(path)
    hf_to_gguf = {hf: name for name, hf in get_gguf_hf_weights_map(adapter.model, TensorProcessor()).items()}
    names = {}
    for layer in layers:
        tensor = hf_to_gguf.get(layer.removeprefix("model.") + ".weight")
        if tensor not in in_file and tensor == "output.weight" and "token_embd.weight" in in_file:
            tensor = "token_embd.weight"
        if tensor not in in_file:
            raise llamacpp.LlamaCppError(f"{layer} has no tensor in {Path(path).name}")
        names[layer] = tensor
    return names


class FileWeights(Mapping[str, torch.Tensor]):
    """Each candidate's weight as llama.cpp wrote it in its type's uniform file, read when asked for: a memory map of
    that tensor's bytes, dequantized by gguf-py, then processed as transformers' GGUF reader processes it when it
    loads the model (llama's query/key row order, for one). The most recently read are kept up to `cache_bytes`, so
    a simulation holds a few layers' weights rather than a model's worth per type (Gemma 3's tied head alone is
    671 MB in fp32 per type)."""

    def __init__(self, files: dict[str, Path], tensors: dict[str, str], model: nn.Module, items: list[str],
                 cache_bytes: int = CACHE_BYTES):
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        self.files, self.tensors, self.model, self.items = files, tensors, model, list(items)
        self.headers = {ggml_type: llamacpp.header(path) for ggml_type, path in files.items()}
        architecture = next(iter(self.headers.values())).architecture if self.headers else ""
        config = model.model.config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        self.processing = {"tensor_key_mapping": get_gguf_hf_weights_map(model.model, self.processor),
                           "parsed_parameters": {"config": config, "tensors": {}}}
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_bytes = cache_bytes

    def __getitem__(self, item: str) -> torch.Tensor:
        if item in self.cache:
            self.cache.move_to_end(item)
            return self.cache[item]
        layer, ggml_type = split_item(item)
        name = self.tensors[layer]
        values = llamacpp.read_tensor(self.files[ggml_type], self.headers[ggml_type].tensors[name])
        values = self.processor.process(weights=values, name=name, **self.processing).weights
        weight = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(
            self.model.get_submodule(layer).weight.shape)
        self.cache[item] = weight
        while sum(w.nbytes for w in self.cache.values()) > self.cache_bytes and len(self.cache) > 1:
            self.cache.popitem(last=False)
        return weight

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class GgmlSimulation(Simulation):
    """Each item's layer with llama.cpp's weights for its type and inputs rounded as llama.cpp rounds them; a tied
    output head's item also changes the token embedding lookup, which reads the same table, and is scored at both
    outputs (`probes`)."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear], low_weights: Mapping[str, torch.Tensor],
                 embedding: nn.Embedding | None, head: str | None):
        self.model, self.modules, self.low_weights = model, modules, low_weights
        self.embedding, self.head = embedding, head
        self.embedding_name = next((name for name, module in model.named_modules() if module is embedding), None)

    def layer(self, item: str) -> str:
        return split_item(item)[0]

    def group(self, item: str) -> str:
        return split_item(item)[1]

    def _ties(self, item: str) -> bool:
        return self.embedding is not None and self.layer(item) == self.head

    def probes(self, item: str) -> dict[str, nn.Module]:
        probes = super().probes(item)
        if self._ties(item):
            probes[self.embedding_name] = self.embedding
        return probes

    @staticmethod
    def _output(item: str, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_activation(x, split_item(item)[1]), weight, module.bias)

    @contextlib.contextmanager
    def quantized(self, names: Iterable[str]):
        chosen = {item: self.low_weights[item] for item in {self.layer(item): item for item in names}.values()}
        replaced = [self.modules[item].register_forward_hook(
            lambda module, args, _out, item=item, weight=weight: self._output(item, module, args[0], weight))
            for item, weight in chosen.items()]
        # The lookup runs its own forward on the swapped table, so a scaled embedding (Gemma's) keeps its scale.
        tied = {self.embedding: weight for item, weight in chosen.items() if self._ties(item)}
        with hooks(replaced), swapped_weights(tied):
            yield

    def _error(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if module is self.embedding:
            with swapped_weights({module: self.low_weights[name]}):
                return module.forward(x) - out  # forward, not the call: the call would run this hook again
        return self._output(name, module, x, self.low_weights[name]) - out


def menu_of(timings: dict[str, tuple[Paired, frozenset[str], int]]) -> dict[str, dict]:
    """Per GGML type, from its timing against the F32 file on a file with the tensors it fits (and their weight
    count): offered when it saves time beyond its noise and more than every wider offered type timed on the same
    tensors (a narrower type that is not faster only loses accuracy). Types timed on different tensors are not
    compared: the K-quants fit only rows that are multiples of 256, and a saving per weight on those is no
    measure of one on all of them; the per-tensor profile decides between them."""
    menu: dict[str, dict] = {}
    best: dict[frozenset[str], float] = {}  # per set of tensors, the largest saving of a wider offered type
    for ggml_type in sorted(timings, key=llamacpp.bits_per_weight, reverse=True):
        timing, layers, weights = timings[ggml_type]
        saves = timing.difference_ms - timing.noise_ms > 0
        offered = saves and timing.difference_ms > best.get(layers, 0.0)
        menu[ggml_type] = {"offered": offered, "reason": "saves time" if offered else
                           "no faster than a wider type" if saves else "saves no measurable time",
                           "bits_per_weight": llamacpp.bits_per_weight(ggml_type), "float_ms": timing.first_ms,
                           "type_ms": timing.second_ms, "saving_ms": timing.difference_ms,
                           "noise_ms": timing.noise_ms, "weights": weights, "timing": timing}
        if offered:
            best[layers] = timing.difference_ms
    return menu


@register
@dataclass
class GgufTypes(Backend):
    priority = 45  # asked first: only a job for llama.cpp takes it
    source: Path | None = None  # the GGUF file the model was read from
    latency: str = "decode"
    threads: int = 1
    menu: dict = field(default_factory=dict)  # per GGML type: its measured saving and whether it is offered

    @classmethod
    def create(cls, offered: Candidates) -> "GgufTypes | None":
        if offered.runtime != RUNTIME or offered.gguf is None:
            return None
        asked = [t for t in offered.formats if t in llamacpp.TYPES]
        items = [join_item(name, ggml_type) for name in offered.linear() for ggml_type in asked
                 if llamacpp.fits(ggml_type, offered.layers[name].in_features)]
        note = ("a GGML type per tensor among " + ", ".join(asked) + ", each plan a GGUF file written by llama.cpp's "
                "quantizer and measured in llama.cpp")
        return cls(NAME, note, offered.adapter, items, offered.adapter, dict(offered.skipped), formats=tuple(asked),
                   source=Path(offered.gguf), latency=offered.latency,
                   threads=torch.get_num_threads())

    @property
    def several(self) -> bool:
        return True  # every candidate names its type, even when the measured menu keeps one

    @property
    def simulated(self) -> nn.Module:
        return self.adapter  # the baseline is the F32 file in llama.cpp; the simulation runs the torch model

    def __post_init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="mixq-gguf-"))
        # Removed by close(), or when the backend is collected or at exit (a __del__ at exit can outlive shutil).
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.files: dict[frozenset, Path] = {}

    # ---- files ----------------------------------------------------------------------------------------

    def fit(self, calibration: list[Inputs]) -> None:
        """The F32 file (the baseline), the tensor names, and the measured menu of types."""
        self.prompt = calibration[0][0][0].tolist()
        self.context = calibration[0][0].shape[1] + 1
        self.float_path = self.folder / "float.gguf"
        llamacpp.to_float(self.source, self.float_path, self.threads)
        self.tensors = tensor_names(self.adapter, self.layers, self.float_path)
        self.baseline = self.model(self.float_path)
        self._measure_menu()

    def model(self, path: Path) -> llamacpp.GgufModel:
        """A file loaded in llama.cpp. Not cached: a plan's contexts (and llama.cpp's repacked copy of its weights)
        are freed with the last reference to it, so a search holds only the plans it may still return."""
        return llamacpp.GgufModel(path, self.threads, self.context)

    def file(self, types: dict[str, str]) -> Path:
        """The file with each layer in its type (float layers F32), written once per plan."""
        key = frozenset(types.items())
        if key not in self.files:
            path = self.folder / f"plan-{len(self.files)}.gguf"
            llamacpp.quantize(self.float_path, path, {self.tensors[layer]: types.get(layer, llamacpp.FLOAT_TYPE)
                                                      for layer in self.layers}, self.threads)
            self.files[key] = path
        return self.files[key]

    def uniform(self, ggml_type: str) -> dict[str, str]:
        """Every layer the type fits in that type."""
        return {split_item(item)[0]: ggml_type for item in self.candidates if split_item(item)[1] == ggml_type}

    def build(self, plan: Plan, calibration: list[Inputs]) -> llamacpp.GgufModel:
        types = self._types(plan)
        return self.model(self.file(types)) if types else self.baseline

    @staticmethod
    def _types(plan: Plan) -> dict[str, str]:
        return {layer: precision for layer, precision in plan.layers.items() if precision in llamacpp.TYPES}

    # ---- menu and profile -----------------------------------------------------------------------------

    def _workload(self):
        from ..generation import workload

        return workload(self.latency, (torch.tensor([self.prompt]),))

    def _measure_menu(self) -> None:
        """Each asked type timed against the F32 file on the job's workload, on a file with every layer it fits in
        that type; the menu keeps what `menu_of` offers."""
        workload, timings = self._workload(), {}
        for ggml_type in self.formats:
            layers = self.uniform(ggml_type)
            if layers:
                timing = paired(workload.call(self.baseline), workload.call(self.model(self.file(layers))),
                                rounds=MENU_ROUNDS, inner=1, samples=1)
                timings[ggml_type] = (timing, frozenset(layers), sum(self._numel(layer) for layer in layers))
        self.menu = menu_of(timings)
        offered = {t for t, entry in self.menu.items() if entry["offered"]}
        self.candidates = [item for item in self.candidates if split_item(item)[1] in offered]
        self.formats = tuple(t for t in self.formats if t in offered)

    def _numel(self, layer: str) -> int:
        return self.adapter.get_submodule(layer).weight.numel()

    def menu_report(self) -> dict:
        return {t: {k: v for k, v in entry.items() if k != "timing"} for t, entry in self.menu.items()}

    def profile(self, calibration: list[Inputs], seconds_per_layer: float = 0.5, workload=None) -> LatencyProfile:
        """Each item saves its type's measured saving (the uniform file against the F32 file) in proportion to its
        share of that type's weights; anchored to one whole-file timing of each layer's fastest type."""
        savings = {}
        for item in self.candidates:
            layer, ggml_type = split_item(item)
            timing = self.menu[ggml_type]["timing"]
            share = self._numel(layer) / self.menu[ggml_type]["weights"]  # of the weights its timing covered
            savings[item] = Paired(timing.first_ms, timing.first_ms - share * timing.difference_ms,
                                   share * timing.difference_ms, share * timing.noise_ms)
        chosen = fastest_items(savings, lambda item: split_item(item)[0])
        workload = workload or self._workload()
        plan_model = self.build(Plan(layers=self.assignment(chosen), backend=self.name), calibration)
        whole = paired(workload.call(self.baseline), workload.call(plan_model), rounds=MENU_ROUNDS, inner=1,
                       samples=workload.samples)
        return _anchored("each GGML type timed in llama.cpp on a file with every tensor it fits in that type, "
                         "against the F32 file; a tensor's saving is its share of its type's weights times that "
                         "saving; the sum over each layer's fastest type scaled to one whole-file timing of that plan",
                         savings, chosen, whole)

    # ---- simulation -------------------------------------------------------------------------------------

    def simulation(self, calibration: list[Inputs]) -> Simulation:
        """Each candidate's weight read back from its type's uniform file when the analysis asks for it."""
        weights = FileWeights({t: self.file(self.uniform(t)) for t in self.formats}, self.tensors, self.adapter,
                              self.candidates)
        embedding = self.adapter.model.get_input_embeddings()
        head = next((layer for layer, tensor in self.tensors.items() if tensor == "token_embd.weight"), None)
        modules = {item: self.adapter.get_submodule(split_item(item)[0]) for item in self.candidates}
        return GgmlSimulation(self.adapter, modules, weights, embedding if head else None, head)

    # ---- delivery -----------------------------------------------------------------------------------------

    def deliver(self, plan: Plan, folder: Path) -> dict[str, Path]:
        """The plan's GGUF (the file every figure was measured on; the F32 file when no layer is low) and plan.json."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {"gguf": folder / "model.gguf"}
        types = self._types(plan)
        shutil.copy(self.file(types) if types else self.float_path, files["gguf"])
        plan.save(folder / "plan.json")
        files["plan"] = folder / "plan.json"
        return files

    def close(self) -> None:
        """Free the baseline's llama.cpp contexts and remove the files (delivered files were copied out)."""
        if isinstance(getattr(self, "baseline", None), llamacpp.GgufModel):
            self.baseline.close()
        self._remove_folder()
