"""Loading what a SOURCE names (the grammar is in spec.py): the model, its task, revision and data.

- `hf:<repo_id>[@revision]`: the Hub only; hub.py downloads the commit's safetensors, configs and
  tokenizer files into the cache, and the model loads from that snapshot.
- `local:<path>` (or a plain path): a directory in HF format under the allowed root.
- `builtin:<name>`: offline models built by the project (see builtins.py).

Either folder loads with transformers Auto classes chosen by the config's architecture; remote code is
never trusted and only safetensors weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import builtins, hub, sizing
from .adapters import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION, TEXT_GENERATION
from .catalogue import BUILTIN_INPUTS
from .data import DataOptions, Dataset, Preprocessing, load_dataset_for
from .errors import InputError
from .paths import resolve_under_root
from .spec import LOAD_KWARGS, ModelSpec, directory_revision


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    task: str
    revision: str
    data: Dataset
    metric: str | None = None  # a builtin's own metric for its own data
    gguf: Path | None = None  # the GGUF file a builtin language model was read from


TASK_BY_ARCHITECTURE_SUFFIX = {
    "ForImageClassification": IMAGE_CLASSIFICATION,
    "ForSequenceClassification": SEQUENCE_CLASSIFICATION,
    "ForCausalLM": TEXT_GENERATION,
}


def task_for_config(config) -> str:
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in TASK_BY_ARCHITECTURE_SUFFIX.items():
            if architecture.endswith(suffix):
                return task
    return FEATURE_EXTRACTION


def load_model(spec: ModelSpec, data_options: DataOptions, model_root: Path | None, cache_dir: Path,
               revision: str | None = None, hub_token: bool = False) -> LoadedModel:
    """`revision`, when the caller already resolved it (resolve_revision), is the one loaded: a Hub branch
    that moves in between does not change what this job measures. `hub_token`: whether the Hub may see this
    process's HF_TOKEN (hub.token_for)."""
    if spec.kind == "builtin":
        built = builtins.load_builtin(spec.id, data_options, cache_dir)
        if data_options.spec or data_options.synthetic:  # the user's data, prepared as the builtin's own is
            data = load_dataset_for(built.task, data_options, model_root, cache_dir, built.preprocessing(),
                                    image_shape=_builtin_image_shape(spec.id), hub_token=hub_token)
            return LoadedModel(spec, built.model, built.task, built.version, data, gguf=built.gguf)
        return LoadedModel(spec, built.model, built.task, built.version, built.default_data(), built.metric,
                           built.gguf)
    if spec.kind == "local":
        folder = resolve_under_root(spec.id, model_root, what="model")
        revision = revision or directory_revision(folder)
    else:
        folder, revision = hub.download(spec.id, revision or spec.revision, cache_dir, token=hub_token)
    return _load_transformers(spec, folder, revision, data_options, model_root, cache_dir, hub_token)


def _load_transformers(spec: ModelSpec, folder: Path, revision: str, data_options: DataOptions,
                       model_root: Path | None, cache_dir: Path, hub_token: bool) -> LoadedModel:
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer)

    if not (folder / "config.json").is_file():
        raise InputError(f"{spec} has no config.json: expected a model saved with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(folder, **LOAD_KWARGS)
    except Exception as exc:  # unknown architecture, malformed config
        raise InputError(f"cannot load the model config of {spec}: {type(exc).__name__}: {exc}") from None
    task = task_for_config(config)
    if task == IMAGE_CLASSIFICATION:  # the API checked this already, from the same config; a worker checks again
        sizing.check_memory(sizing.image_bytes(data_options.total_samples, _config_image_shape(config)),
                            data_options.max_input_bytes)
    if task == TEXT_GENERATION:
        sizing.check_memory(sizing.logits_bytes(data_options.calibration_samples, data_options.batch_size,
                                                data_options.seq_len, config.vocab_size), data_options.max_input_bytes)
    auto = {IMAGE_CLASSIFICATION: AutoModelForImageClassification,
            SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
            TEXT_GENERATION: AutoModelForCausalLM}.get(task, AutoModel)
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{spec} has no .safetensors weights: mixq loads only safetensors (pickled weights can "
                         "run code on load)")
    try:
        model = auto.from_pretrained(folder, use_safetensors=True, **LOAD_KWARGS).eval()
    except Exception as exc:
        raise InputError(f"cannot load the weights of {spec}: {type(exc).__name__}: {exc}") from None

    def processor(auto_class, files: str):
        def load():
            try:
                return auto_class.from_pretrained(folder, **LOAD_KWARGS)
            except (OSError, ValueError, TypeError):
                raise InputError(f"{spec} has no {files}: it is needed to prepare this data") from None
        return load

    preprocessing = Preprocessing(
        load_tokenizer=processor(AutoTokenizer, "tokenizer files (tokenizer.json or vocab.txt with "
                                                "tokenizer_config.json)"),
        load_image_processor=processor(AutoImageProcessor, "image processor (preprocessor_config.json); pass an "
                                                           ".npz of pixel_values instead"),
        vocab_size=getattr(config, "vocab_size", None) or 30522,
        label2id=dict(getattr(config, "label2id", None) or {}), num_labels=getattr(config, "num_labels", None))
    data = load_dataset_for(task, data_options, model_root, cache_dir, preprocessing,
                            image_shape=_config_image_shape(config), hub_token=hub_token)
    return LoadedModel(spec, model, task, revision, data)


def _builtin_image_shape(name: str) -> tuple[int, ...] | None:
    kind, shape = BUILTIN_INPUTS[name]
    return shape if kind == "image" else None


def _config_image_shape(config) -> tuple[int, ...]:
    """The input size a loaded config declares (as the API checked it: a malformed one is an InputError)."""
    return sizing.image_shape(config.to_dict()) or sizing.DEFAULT_IMAGE
