"""llama.cpp as a runtime (`--runtime llama.cpp`): GGUF files with a GGML type per tensor, written by llama.cpp's
own quantizer and run by llama.cpp itself, through llama-cpp-python.

- `quantize` writes a file whose every named tensor has the type asked for (`llama_model_quantize` with one
  anchored `tt_overrides` pattern per tensor), then reads the file back and refuses it if llama.cpp chose another
  type anywhere (its quantizer silently falls back where a tensor's rows do not fit a type's blocks).
- `GgufModel` is such a file loaded in llama.cpp: called on a batch of token windows it returns their logits, as a
  torch causal LM does (each window from an empty cache), so the evaluator scores it like any plan; `decoding` and
  `prefilling` are the generation workloads (generation.py) run in llama.cpp.
- `load_backends` picks the CPU kernels llama.cpp runs: the install builds every x86-64 variant of ggml's CPU
  backend (GGML_CPU_ALL_VARIANTS) and this loads the best one the worker's CPU supports, so one build serves any
  worker. AMX variants are refused: on an AMX Xeon (2026-12-04) their int8 tile kernels crashed on every batch of
  two or more tokens of a quantized file (`ldtilecfg`; the tile configuration is half-initialised), which is every
  prompt; the next best variant (AVX-512 VNNI/BF16) runs there instead.
"""

from __future__ import annotations

import ctypes
import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cost
from .plan import GGML_TYPES as TYPES

FLOAT_TYPE = "F32"  # the baseline file: every tensor as the model gives it
AMX_VARIANT = "sapphirerapids"


class LlamaCppError(RuntimeError):
    """llama.cpp could not do what was asked (a load, a quantization): says which file and why."""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def bits_per_weight(ggml_type: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return 8 * size / block


def fits(ggml_type: str, columns: int) -> bool:
    """Whether rows of `columns` values split into whole blocks of the type (K-quants: 256; the rest: 32)."""
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return columns % block == 0


@dataclass(frozen=True)
class Kernels:
    """Which of ggml's CPU backend variants llama.cpp runs on this worker, and why."""

    variant: str
    library: str = ""  # its file: what GGML_BACKEND_PATH names to load the same kernels outside mixq
    refused: tuple[str, ...] = ()
    note: str = ""

    def to_dict(self) -> dict:
        return {"cpu_variant": self.variant, "cpu_library": self.library, "refused": list(self.refused),
                "note": self.note}


GGML_LOG_ERROR = 4  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


@functools.cache
def _library():
    """llama-cpp-python, with llama.cpp's log reduced to its errors, which go to this module's logger: it logs every
    tensor of a quantization and every key of a load, and the binding's own filter reads the log levels in an older
    order (a warning passes it as an error)."""
    import logging

    import llama_cpp

    logger = logging.getLogger(__name__)

    @llama_cpp.llama_log_callback
    def errors_only(level, text, _user_data):
        if level == GGML_LOG_ERROR:
            logger.error(text.decode("utf-8", "replace").rstrip())

    llama_cpp.llama_log_set(errors_only, ctypes.c_void_p(0))
    _library.callback = errors_only  # kept alive as long as llama.cpp may call it
    return llama_cpp


def _library_folder() -> Path:
    return Path(_library().__file__).parent / "lib"


@functools.cache
def load_backends() -> Kernels:
    """Load the best CPU variant of ggml this CPU runs (the AMX variant refused where the CPU has AMX), once per
    process and before any model. A build without variants (one CPU backend linked in) is used as it is."""
    from .hardware import detect

    amx = "amx_int8" in detect().flags
    _library()  # loads libllama and libggml
    folder = _library_folder()
    variants = sorted(folder.glob("libggml-cpu-*.so"))
    if not variants:
        return Kernels("built in", note="llama-cpp-python was built with one CPU backend, not per-CPU variants")
    scored, refused = [], []
    for path in variants:
        name = path.name.removeprefix("libggml-cpu-").removesuffix(".so")
        library = ctypes.CDLL(str(path))
        library.ggml_backend_score.restype = ctypes.c_int
        score = library.ggml_backend_score()  # 0: this CPU lacks an instruction the variant was built with
        if score and amx and name == AMX_VARIANT:
            refused.append(name)
        elif score:
            scored.append((score, name, path))
    if not scored:
        raise LlamaCppError(f"no ggml CPU variant in {folder} runs on this CPU")
    _, name, path = max(scored)
    # By its soname: the one libllama loaded (a wheel holds copies, not symlinks, so libggml.so would be a second
    # library with a registry of its own, and llama.cpp would see no backend).
    ggml = ctypes.CDLL("libggml.so.0")
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(str(path).encode()):
        raise LlamaCppError(f"llama.cpp could not load its CPU backend {path.name}")
    note = ("AMX variant refused: its int8 tile kernels crashed on batches of 2+ tokens of quantized files on an "
            "AMX Xeon (2026-12-04)") if refused else ""
    return Kernels(name, str(path), tuple(refused), note)


def _quantize_params(ftype: int, overrides: list[tuple[str, str]], requantize: bool, threads: int):
    import gguf

    llama_cpp = _library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.allow_requantize, params.pure = threads, ftype, requantize, True
    if overrides:
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        keep = []  # the patterns' bytes must outlive the call
        for entry, (name, ggml_type) in zip(table, overrides):
            keep.append(f"^{re.escape(name)}$".encode())
            entry.pattern, entry.type = keep[-1], int(gguf.GGMLQuantizationType[ggml_type])
        table[len(overrides)].pattern = None  # the list ends with a NULL pattern
        params.tt_overrides = table
        params._keep = (table, keep)
    return params


def _write(source: Path, target: Path, params, what: str) -> None:
    """`source` through llama.cpp's quantizer into `target` with `params`; `what` says what failed."""
    if _library().llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise LlamaCppError(f"llama.cpp could not {what} {source.name}")


def quantize(source: Path, target: Path, types: dict[str, str], threads: int, requantize: bool = False) -> None:
    """`source` written to `target` with each tensor named in `types` in its GGML type (one of TYPES or F32) and every
    other tensor in Q8_0 (1-D tensors, norms, stay F32 as llama.cpp keeps them). Refused, with the tensors named, if
    the file llama.cpp wrote differs from what was asked."""
    import gguf

    params = _quantize_params(int(gguf.LlamaFileType.MOSTLY_Q8_0), sorted(types.items()), requantize, threads)
    _write(source, target, params, "quantize")
    written = tensor_types(target)
    wrong = {name: (ggml_type, written.get(name)) for name, ggml_type in types.items()
             if written.get(name) != ggml_type}
    if wrong:
        raise LlamaCppError(f"llama.cpp wrote other types than asked (asked, written): {dict(list(wrong.items())[:5])}")


def to_float(source: Path, target: Path, threads: int) -> None:
    """Every tensor of `source` (quantized or not) in F32: the baseline file, holding exactly the weights the torch
    model was read from the same file with (transformers dequantizes GGUF tensors the same way)."""
    import gguf

    params = _quantize_params(int(gguf.LlamaFileType.ALL_F32), [], requantize=True, threads=threads)
    _write(source, target, params, "write in F32")


def recipe(source: Path, target: Path, name: str, threads: int) -> None:
    """`source` quantized by one of llama.cpp's own recipes (`name` as its quantize tool says it: Q8_0, Q4_K_M, ...),
    with llama.cpp's choice of type per tensor: the uniform plans a user picks by hand, which a plan is compared
    with (bench/llamacpp.py)."""
    import gguf

    params = _quantize_params(int(gguf.LlamaFileType[f"MOSTLY_{name}"]), [], requantize=True, threads=threads)
    params.pure = False
    _write(source, target, params, f"quantize to {name}")


# Bytes of each fixed-size GGUF value type (gguf.GGUFValueType: UINT8 ... FLOAT64); STRING and ARRAY vary.
_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32, _STRING, _ARRAY = 4, 8, 9
_DEFAULT_ALIGNMENT = 32  # GGUF's, where `general.alignment` does not say


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies in a GGUF file and how to read it."""
    ggml_type: str
    shape: tuple[int, ...]  # numpy's order (rows first), as gguf-py reads it
    offset: int  # from the start of the file


@dataclass(frozen=True)
class Header:
    architecture: str
    tensors: dict[str, TensorInfo]


def header(path: Path) -> Header:
    """A GGUF file's architecture and tensor index, read from the header alone: gguf.GGUFReader parses every
    metadata value into numpy first (a tokenizer's 49,152 tokens and merges: 6 s per file, once per plan)."""
    import gguf

    with open(path, "rb") as handle:
        def read(fmt: str):
            values = struct.unpack("<" + fmt, handle.read(struct.calcsize("<" + fmt)))
            return values[0] if len(values) == 1 else values

        def skip(value_type: int) -> None:
            if value_type == _STRING:
                handle.seek(read("Q"), 1)
            elif value_type == _ARRAY:
                item_type, count = read("IQ")
                if item_type in _VALUE_BYTES:
                    handle.seek(_VALUE_BYTES[item_type] * count, 1)
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                handle.seek(_VALUE_BYTES[value_type], 1)

        magic, _version, tensor_count, values = read("IIQQ")
        if magic != gguf.GGUF_MAGIC:
            raise LlamaCppError(f"{Path(path).name} is not a GGUF file")
        architecture, alignment = "", _DEFAULT_ALIGNMENT
        for _ in range(values):
            key, value_type = handle.read(read("Q")).decode(), read("I")
            if key == "general.architecture" and value_type == _STRING:
                architecture = handle.read(read("Q")).decode()
            elif key == "general.alignment" and value_type == _UINT32:
                alignment = read("I")
            else:
                skip(value_type)
        entries = []
        for _ in range(tensor_count):
            name = handle.read(read("Q")).decode()
            dimensions = read("I")
            shape = struct.unpack(f"<{dimensions}Q", handle.read(8 * dimensions))
            ggml_type, offset = read("IQ")
            entries.append((name, gguf.GGMLQuantizationType(ggml_type).name, tuple(reversed(shape)), offset))
        data = -(-handle.tell() // alignment) * alignment  # tensor data starts at the next aligned byte
    return Header(architecture, {name: TensorInfo(ggml_type, shape, data + offset)
                                 for name, ggml_type, shape, offset in entries})


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type, as the file's header says."""
    return {name: info.ggml_type for name, info in header(path).tensors.items()}


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor's values in fp32, dequantized by gguf-py from a memory map of its bytes alone (GGML's own
    arithmetic: the values llama.cpp's dot products see)."""
    import gguf

    ggml_type = gguf.GGMLQuantizationType[info.ggml_type]
    data = np.memmap(path, np.uint8, "r", offset=info.offset,
                     shape=gguf.quant_shape_to_byte_shape(info.shape, ggml_type))
    return gguf.dequantize(data, ggml_type)


class GgufModel:
    """A GGUF file loaded in llama.cpp, called as the torch causal LMs are: token windows in, logits out."""

    def __init__(self, path: Path, threads: int, context: int):
        self.path, self.threads, self.context = Path(path), threads, context
        self.kernels = load_backends()
        self.size_bytes = self.path.stat().st_size
        self._scorer = self._runner = None

    def _load(self, all_logits: bool):
        from llama_cpp import Llama

        try:
            return Llama(str(self.path), n_ctx=self.context, n_batch=self.context, n_ubatch=self.context,
                         n_threads=self.threads, n_threads_batch=self.threads, logits_all=all_logits,
                         verbose=False)
        except ValueError as exc:  # the binding's way of saying the file did not load
            raise LlamaCppError(f"llama.cpp could not load {self.path.name}: {exc}") from None

    @property
    def scorer(self):
        """The context that keeps every position's logits (scoring windows)."""
        if self._scorer is None:
            self._scorer = self._load(all_logits=True)
        return self._scorer

    @property
    def runner(self):
        """The context that computes only the last position's logits, as generation does (timing)."""
        if self._runner is None:
            self._runner = self._load(all_logits=False)
        return self._runner

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        llm, rows = self.scorer, []
        for window in input_ids.tolist():
            llm.reset()
            llm.eval(window)
            rows.append(torch.from_numpy(np.array(llm.scores[:len(window)], dtype=np.float32)))
        return torch.stack(rows)

    def decoding(self, prompt: list[int]):
        """One token generated after the prompt in the cache; the cache is cut back to the prompt after each step,
        so every timed step sees the same cache (as generation.DecodeStep in torch)."""
        llm = self.runner
        llm.reset()
        llm.eval(prompt)
        cost.count("forward", 1)  # the prompt's prefill, run once to set up the timed steps
        cached = llm.n_tokens

        def step():
            llm.n_tokens = cached  # the next eval drops every cached position from here on
            llm.eval(prompt[-1:])
        return step

    def prefilling(self, prompt: list[int]):
        """The prompt from an empty cache: time to first token."""
        llm = self.runner

        def prefill():
            llm.reset()
            llm.eval(prompt)
        return prefill

    def close(self) -> None:
        for llm in (self._scorer, self._runner):
            if llm is not None:
                llm.close()
        self._scorer = self._runner = None
