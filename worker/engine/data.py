"""Calibration, evaluation and test data: disjoint splits of batches of model inputs, with optional labels.

Calibration feeds the sensitivity analysis and static activation ranges; evaluation scores every plan
the search considers; test scores only the final plan, once, so its figure is free of selection bias.

A `Dataset` is what every other phase consumes. It comes from a builtin, an HF dataset ID, a local
file under the allowed root (JSONL/CSV text, a folder of images per class, or `.npz`), or, only when
asked for explicitly, synthetic inputs.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION, TEXT_GENERATION
from . import hub
from .errors import InputError
from .paths import HF_CONFIG, HF_REPO_ID, SPLIT_NAME, resolve_under_root

Batch = dict[str, torch.Tensor]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class DataOptions:
    spec: str | None = None  # HF dataset ID (`hf:name[@config]`) or a path under the model root
    split: str = "train"
    text_column: str = "text"
    label_column: str | None = "label"
    image_column: str = "image"
    synthetic: bool = False
    calibration_samples: int = 128
    eval_samples: int = 256
    test_samples: int = 256
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    max_input_bytes: int | None = None  # the service's memory limit, checked again before images are allocated

    @property
    def total_samples(self) -> int:
        return self.calibration_samples + self.eval_samples + self.test_samples


SPLITS = ("calibration", "evaluation", "test")


def _missing(what: str) -> Callable[[], object]:
    def fail():
        raise InputError(f"the model has no {what}")
    return fail


@dataclass
class Preprocessing:
    """How raw text or images become model inputs. Each is loaded only when the data needs it, so a model
    saved without tokenizer or image-processor files still runs on ready-made inputs (.npz, synthetic)."""

    load_tokenizer: Callable[[], object] = _missing("tokenizer to prepare text")
    load_image_processor: Callable[[], object] = _missing("image processor to prepare images; use an .npz of "
                                                          "pixel_values")
    vocab_size: int = 30522  # for synthetic token ids
    # The model's classes, for naming the class folders of an image folder (see `class_indices`).
    label2id: dict[str, int] | None = None
    num_labels: int | None = None
    image_mode: str = "RGB"  # PIL mode of the model's images ("L" for a one-channel model)


@dataclass
class Dataset:
    calibration: list[Batch]
    evaluation: list[Batch]
    test: list[Batch]
    labelled: bool
    description: str
    synthetic: bool = False
    sizes: dict = field(default_factory=dict)


def split_batches(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, options: DataOptions,
                  description: str, synthetic: bool = False) -> Dataset:
    """Shuffle once with the seed, then cut disjoint calibration, evaluation and test splits."""
    n = len(next(iter(inputs.values())))
    wanted = {"calibration": options.calibration_samples, "evaluation": options.eval_samples,
              "test": options.test_samples}
    if n < len(SPLITS):
        raise InputError(f"data has {n} example(s); need at least {len(SPLITS)} for disjoint calibration, "
                         "evaluation and test splits")
    sizes = dict(wanted)
    if sum(wanted.values()) > n:  # shrink every split proportionally rather than overlap them
        scale = n / sum(wanted.values())
        sizes = {split: max(1, int(count * scale)) for split, count in wanted.items()}
        while sum(sizes.values()) > n:  # the max(1, ·) floors can overshoot on tiny data
            largest = max(sizes, key=sizes.get)
            sizes[largest] -= 1
        sizes["test"] += n - sum(sizes.values())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed))
    bounds = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
    parts = {split: order[bounds[i]:bounds[i + 1]] for i, split in enumerate(SPLITS)}

    return Dataset(**{split: _batched(inputs, labels, parts[split], options.batch_size) for split in SPLITS},
                   labelled=labels is not None, description=description, synthetic=synthetic, sizes=sizes)


def _batched(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, index: torch.Tensor, size: int
             ) -> list[Batch]:
    out = []
    for start in range(0, len(index), size):
        rows = index[start:start + size]
        batch = {k: v[rows] for k, v in inputs.items()}
        if labels is not None:
            batch["labels"] = labels[rows]
        out.append(batch)
    return out


def _start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text of its own accord (a BOS token, or none)."""
    plain = tokenizer("start", add_special_tokens=False)["input_ids"]
    full = tokenizer("start")["input_ids"]
    for offset in range(len(full) - len(plain) + 1):
        if full[offset:offset + len(plain)] == plain:
            return list(full[:offset])
    return []


def token_windows(tokenizer, documents: list[str], options: DataOptions, description: str) -> Dataset:
    """A causal language model's text: each document tokenized and cut into non-overlapping windows of
    `seq_len` tokens (a shorter tail is dropped), and whole documents dealt to the calibration, evaluation and
    test splits in a seeded shuffle, so no document lends text to two splits. The windows are their own labels
    (the next token at every position): the metric is perplexity. Each window starts as the tokenizer starts a
    text (Gemma's with its BOS token: without it Gemma 3 270M's perplexity on news text was 1,023 against 11
    with it; SmolLM2's tokenizer adds nothing)."""
    start = _start_tokens(tokenizer)
    length = options.seq_len - len(start)
    if length < 1:
        raise InputError(f"seq_len {options.seq_len} leaves no text after the tokenizer's {len(start)} start token(s)")
    windows = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows.append([start + ids[i:i + length] for i in range(0, len(ids) - length + 1, length)])
    available = sum(len(w) for w in windows)
    wanted = [options.calibration_samples, options.eval_samples, options.test_samples]
    if available < len(SPLITS) or sum(1 for w in windows if w) < len(SPLITS):
        raise InputError(f"the text gives {available} window(s) of {length} tokens from "
                         f"{sum(1 for w in windows if w)} document(s); need at least one document per split")
    if sum(wanted) > available:  # shrink every split proportionally rather than share a document
        wanted = [max(1, int(count * available / sum(wanted))) for count in wanted]
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(options.seed)).tolist()
    parts: list[list[list[int]]] = [[] for _ in SPLITS]
    split = 0
    for document in order:
        while split < len(SPLITS) - 1 and len(parts[split]) >= wanted[split]:
            split += 1
        parts[split] += windows[document][:wanted[split] - len(parts[split])]
    if not all(parts):
        raise InputError(f"the text's {available} windows of {length} tokens do not reach every split")
    batches = {}
    for name, rows in zip(SPLITS, parts):
        ids = torch.tensor(rows, dtype=torch.long)
        batches[name] = _batched({"input_ids": ids}, None, torch.arange(len(ids)), options.batch_size)
    return Dataset(**batches, labelled=True, sizes={name: len(rows) for name, rows in zip(SPLITS, parts)},
                   description=f"{description}: {sum(len(p) for p in parts)} windows of {length} tokens, "
                               "documents disjoint across splits")


def tokenize(tokenizer, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def load_dataset_for(task: str, options: DataOptions, model_root: Path | None, cache_dir: Path,
                     preprocessing: Preprocessing | None = None,
                     image_shape: tuple[int, ...] | None = None, hub_token: bool = False) -> Dataset:
    """Data for a non-builtin model (or a builtin given the user's data), from `options.spec` or (explicitly)
    synthetic. `hub_token` as for hub.download."""
    preprocessing = preprocessing or Preprocessing()
    if options.synthetic:
        return synthetic(task, options, preprocessing.vocab_size, image_shape)
    if not options.spec:
        raise InputError("this model brings no data: pass --data (an HF dataset ID or a file under the model root), "
                         "or --synthetic-data to measure on random inputs")
    if options.spec.startswith("hf:"):
        texts, images, labels, where = _read_hf_dataset(options, task, cache_dir, hub_token)
    else:
        path = resolve_under_root(options.spec, model_root, what="data")
        if task == IMAGE_CLASSIFICATION and path.is_dir():
            preprocessing.load_image_processor()  # a model that cannot prepare images says so before any is read
        texts, images, labels, arrays = _read_local(path, options, task, preprocessing)
        where = str(path)
        if arrays is not None:
            return split_batches(arrays, labels, options, f"{where} (.npz)")
    if task == TEXT_GENERATION:
        if texts is None:
            raise InputError(f"{where} has no text for a language model")
        return token_windows(preprocessing.load_tokenizer(), texts, options, where)
    if task == IMAGE_CLASSIFICATION:
        if images is None:
            raise InputError(f"{where} has no images for an image classifier")
        processor = preprocessing.load_image_processor()
        pixels = processor(images=[img.convert(preprocessing.image_mode) for img in images],
                           return_tensors="pt")["pixel_values"]
        inputs = {"pixel_values": pixels}
    else:
        if texts is None:
            raise InputError(f"{where} has no text column {options.text_column!r}")
        inputs = tokenize(preprocessing.load_tokenizer(), texts, options.seq_len)
    if task == FEATURE_EXTRACTION:
        labels = None  # embeddings are scored by fidelity to the fp32 model
    return split_batches(inputs, labels, options, where)


def _labels_tensor(values: list) -> torch.Tensor:
    labels = []
    for row, value in enumerate(values):
        try:
            labels.append(int(value))
        except (TypeError, ValueError):  # the value itself is never echoed: data may be confidential
            raise InputError(f"labels must be integers: row {row} holds a {type(value).__name__} that is not "
                             "one") from None
    return torch.tensor(labels)


WORDNET_ID = re.compile(r"n\d{8}")
IMAGENET_CLASSES = 1000


def class_indices(folders: list[str], label2id: dict[str, int] | None, num_labels: int | None) -> dict[str, int]:
    """Each class folder's index among the model's classes: by the model's own labels (`config.label2id`) where
    the folder names are labels, or, for the 1000-folder ImageNet layout of WordNet ids, by their sorted
    order (the standard class indices). Anything else is refused: never silently shifted labels."""
    labels = {name.lower(): index for name, index in (label2id or {}).items()}
    if labels and all(folder.lower() in labels for folder in folders):
        return {folder: labels[folder.lower()] for folder in folders}
    if all(WORDNET_ID.fullmatch(folder) for folder in folders):
        if num_labels != IMAGENET_CLASSES or len(folders) != IMAGENET_CLASSES:
            raise InputError(
                f"{len(folders)} WordNet-id folders for a model with {num_labels or 'unknown'} classes: WordNet ids "
                f"name ImageNet classes only as the full {IMAGENET_CLASSES}-folder layout (sorted = class index) of "
                f"a {IMAGENET_CLASSES}-class model; otherwise name each folder by one of the model's labels")
        return {folder: index for index, folder in enumerate(sorted(folders))}
    unknown = [folder for folder in folders if folder.lower() not in labels][:5]
    known = ", ".join(list(label2id or {})[:8]) or "none: the model has no named labels"
    raise InputError(f"class folders {unknown} are not labels of the model (its labels: {known}), nor a "
                     f"{IMAGENET_CLASSES}-folder ImageNet layout of WordNet ids")


def _read_image_folder(path: Path, preprocessing: Preprocessing):
    from PIL import Image

    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if not folders:
        raise InputError(f"{path} is a folder but has no class sub-folders of images")
    index = class_indices([folder.name for folder in folders], preprocessing.label2id, preprocessing.num_labels)
    images, labels = [], []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as image:  # decoded now: a lazily opened file would hold its descriptor
                    images.append(image.convert(preprocessing.image_mode))
                labels.append(index[folder.name])
    if not images:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    return images, torch.tensor(labels)


def _read_local(path: Path, options: DataOptions, task: str, preprocessing: Preprocessing):
    """Returns (texts, images, labels, arrays); `arrays` is set only for .npz files."""
    if path.is_dir():
        return None, *_read_image_folder(path, preprocessing), None
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "pixel_values" not in archive and "x" not in archive:
                raise InputError(f"{path} needs an array named 'pixel_values' (or 'x'), optional 'labels' (or 'y')")
            x = torch.from_numpy(archive["pixel_values"] if "pixel_values" in archive else archive["x"]).float()
            y = archive["labels"] if "labels" in archive else archive["y"] if "y" in archive else None
        return None, None, None if y is None else torch.from_numpy(y).long(), {"pixel_values": x}
    if suffix == ".txt":  # one text (a document, a sentence) per line
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()], None, None, None
    if suffix in (".jsonl", ".csv"):
        rows = _read_rows(path, suffix)
        if not rows:
            raise InputError(f"{path} has no rows")
        if options.text_column not in rows[0]:
            raise InputError(f"{path} has no column {options.text_column!r} (columns: {', '.join(rows[0])})")
        texts = [str(r[options.text_column]) for r in rows]
        has_labels = options.label_column and all(r.get(options.label_column) not in (None, "") for r in rows)
        labels = _labels_tensor([r[options.label_column] for r in rows]) if has_labels else None
        return texts, None, labels, None
    raise InputError(f"unsupported data file {path.name}: use .jsonl, .csv, .txt, .npz or a folder of images per class")


def _read_rows(path: Path, suffix: str) -> list[dict]:
    with path.open(newline="") as handle:
        if suffix == ".csv":
            return list(csv.DictReader(handle))
        try:
            return [json.loads(line) for line in handle if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSONL: {exc}") from None


def parse_hf_dataset_id(spec: str) -> tuple[str, str | None]:
    """`hf:name[@config]` -> (name, config)."""
    body = spec.removeprefix("hf:")
    name, _, config = body.partition("@")
    if not HF_REPO_ID.fullmatch(name):
        raise InputError(f"invalid HF dataset ID {name!r}")
    if config and not HF_CONFIG.fullmatch(config):
        raise InputError(f"invalid HF dataset config {config!r}")
    return name, config or None


def _read_hf_dataset(options: DataOptions, task: str, cache_dir: Path, hub_token: bool):
    """Returns (texts, images, labels, description) from a Hub dataset, downloaded first (hub.py)."""
    import datasets

    name, config = parse_hf_dataset_id(options.spec)
    if not SPLIT_NAME.fullmatch(options.split):
        raise InputError(f"invalid split {options.split!r}: a split is a name such as train or validation")
    folder, sha = hub.download(name, None, cache_dir, repo_type=hub.DATASET, token=hub_token)
    where = f"hf:{name}@{sha[:12]}"
    limit = options.calibration_samples + options.eval_samples + options.test_samples
    try:
        ds = datasets.load_dataset(str(folder), config, split=f"{options.split}[:{limit}]",
                                   cache_dir=str(Path(cache_dir) / "datasets"))
    except Exception as exc:  # a missing split or config, unreadable files: say which, never echo the data
        raise InputError(f"could not load split {options.split!r} of dataset {where} "
                         f"({type(exc).__name__})") from None
    columns = ds.column_names
    labels = None
    if options.label_column and options.label_column in columns:
        labels = _labels_tensor(ds[options.label_column])
    if task == IMAGE_CLASSIFICATION:
        if options.image_column not in columns:
            raise InputError(f"dataset has no image column {options.image_column!r} (columns: {columns})")
        return None, list(ds[options.image_column]), labels, where
    if options.text_column not in columns:
        raise InputError(f"dataset has no text column {options.text_column!r} (columns: {columns})")
    return list(ds[options.text_column]), None, labels, where


def synthetic(task: str, options: DataOptions, vocab_size: int = 30522,
              image_shape: tuple[int, ...] | None = None) -> Dataset:
    """Random inputs: only for latency work or smoke tests; the metric is fidelity to the fp32 model."""
    n = options.total_samples
    generator = torch.Generator().manual_seed(options.seed)
    if task == IMAGE_CLASSIFICATION:
        inputs = {"pixel_values": torch.randn((n, *(image_shape or (3, 224, 224))), generator=generator)}
    else:
        inputs = {
            "input_ids": torch.randint(min(1000, vocab_size // 2), vocab_size, (n, options.seq_len),
                                       generator=generator),
            "attention_mask": torch.ones(n, options.seq_len, dtype=torch.long),
        }
    return split_batches(inputs, None, options, "synthetic random inputs", synthetic=True)
