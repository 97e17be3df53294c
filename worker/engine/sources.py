"""Loading what a SOURCE names (the grammar is in spec.py): the model, its task, revision and data.

- `hf:<repo_id>[@revision]`: transformers Auto classes chosen by the config's architecture;
  remote code is never trusted and only safetensors weights are loaded.
- `local:<path>` (or a plain path): a directory in HF format under the allowed root.
- `builtin:<name>`: offline models built by the project (see builtins.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import builtins
from .adapters import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION
from .data import DataOptions, Dataset, load_dataset_for
from .errors import InputError
from .paths import resolve_under_root
from .spec import ModelSpec, directory_revision, hf_load_kwargs


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    task: str
    revision: str
    data: Dataset
    metric: str | None = None  # a builtin's own metric for its own data


TASK_BY_ARCHITECTURE_SUFFIX = {
    "ForImageClassification": IMAGE_CLASSIFICATION,
    "ForSequenceClassification": SEQUENCE_CLASSIFICATION,
}


def task_for_config(config) -> str:
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in TASK_BY_ARCHITECTURE_SUFFIX.items():
            if architecture.endswith(suffix):
                return task
    return FEATURE_EXTRACTION


def load_model(spec: ModelSpec, data_options: DataOptions, model_root: Path | None, cache_dir: Path,
               revision: str | None = None) -> LoadedModel:
    """`revision`, when the caller already resolved it (resolve_revision), is not computed again."""
    if spec.kind == "builtin":
        built = builtins.load_builtin(spec.id, data_options, cache_dir)
        if data_options.spec or data_options.synthetic:
            built.data = load_dataset_for(built.task, data_options, model_root, tokenizer=built.tokenizer,
                                          image_shape=_image_shape(built.data))
            built.metric = None
        return LoadedModel(spec, built.model, built.task, built.version, built.data, built.metric)
    location = str(resolve_under_root(spec.id, model_root, what="model")) if spec.kind == "local" else spec.id
    return _load_transformers(spec, location, data_options, model_root, revision)


def _load_transformers(spec: ModelSpec, location: str, data_options: DataOptions, model_root: Path | None,
                       revision: str | None):
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                              AutoModelForSequenceClassification, AutoTokenizer)

    kwargs = hf_load_kwargs(spec)
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except Exception as exc:  # unreachable hub, missing repo, not an HF folder
        raise InputError(f"cannot load model config for {spec}: {exc}") from None
    task = task_for_config(config)
    auto = {IMAGE_CLASSIFICATION: AutoModelForImageClassification,
            SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification}.get(task, AutoModel)
    try:
        # Safetensors only: pickled .bin weights can execute code on load.
        model = auto.from_pretrained(location, use_safetensors=True, **kwargs).eval()
    except Exception as exc:
        raise InputError(f"cannot load model weights for {spec} (safetensors required): {exc}") from None
    tokenizer = image_processor = None
    if task == IMAGE_CLASSIFICATION:
        image_processor = AutoImageProcessor.from_pretrained(location, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    data = load_dataset_for(task, data_options, model_root, tokenizer=tokenizer, image_processor=image_processor,
                            image_shape=_config_image_shape(config))
    return LoadedModel(spec, model, task, revision or _revision(spec, location, model), data)


def _image_shape(data: Dataset) -> tuple[int, ...] | None:
    pixels = data.calibration[0].get("pixel_values")
    return None if pixels is None else tuple(pixels.shape[1:])


def _config_image_shape(config) -> tuple[int, ...]:
    size = getattr(config, "image_size", 224)
    return (getattr(config, "num_channels", 3), size, size)


def _revision(spec: ModelSpec, location: str, model: torch.nn.Module) -> str:
    if spec.kind == "local":
        return directory_revision(Path(location))
    commit = getattr(model.config, "_commit_hash", None)
    return commit or spec.revision or "main"


