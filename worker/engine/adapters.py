"""Uniform, traceable forwards over transformers models.

Every model the engine handles is wrapped so that `forward(*tensors) -> Tensor`: logits for
classifiers and language models, mean-pooled embeddings for feature extractors. Evaluation, sensitivity, quantization and
latency all call the same wrapper, and FX can trace it (transformers' own forward is not traceable:
keyword plumbing, shape checks and output dataclasses).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

IMAGE_CLASSIFICATION = "image-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"
FEATURE_EXTRACTION = "feature-extraction"
TEXT_GENERATION = "text-generation"
TASKS = (IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION, FEATURE_EXTRACTION, TEXT_GENERATION)

QUANTIZABLE = (nn.Linear, nn.Conv2d)


class ModelAdapter(nn.Module):
    """Holds the transformers model as `self.model`, so layer names inside it keep a `model.` prefix."""

    input_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(batch[name] for name in self.input_names)


class ImageClassifier(ModelAdapter):
    input_names = ("pixel_values",)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        resnet = getattr(self.model, "resnet", None)
        if resnet is not None:
            # transformers' ResNet checks the channel count in Python, which FX cannot trace: call its stages.
            hidden = resnet.embedder.pooler(resnet.embedder.embedder(pixel_values))
            for stage in resnet.encoder.stages:
                hidden = stage(hidden)
            return self.model.classifier(resnet.pooler(hidden))
        if not hasattr(self.model, "config"):  # a plain torch classifier (EfficientNet-Lite): logits directly
            return self.model(pixel_values)
        return self.model(pixel_values=pixel_values).logits


class SequenceClassifier(ModelAdapter):
    input_names = ("input_ids", "attention_mask")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class SentenceEmbedder(ModelAdapter):
    """Mean pooling over non-padding tokens, as sentence-transformers does for all-MiniLM-L6-v2."""

    input_names = ("input_ids", "attention_mask")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class CausalLM(ModelAdapter):
    """Next-token logits for every position of full windows (no padding, so no attention mask). Generation's own
    timings (a decoding step with its cache, a prefill) call `self.model` directly: generation.py."""

    input_names = ("input_ids",)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


ADAPTERS = {
    IMAGE_CLASSIFICATION: ImageClassifier,
    SEQUENCE_CLASSIFICATION: SequenceClassifier,
    FEATURE_EXTRACTION: SentenceEmbedder,
    TEXT_GENERATION: CausalLM,
}


def adapt(model: nn.Module, task: str) -> ModelAdapter:
    """The model keeps the attention kernel transformers chose for it (SDPA where supported): that is
    what users deploy, so baseline, plans, latency and artifact all run it."""
    if task not in ADAPTERS:
        raise ValueError(f"unsupported task {task!r}; supported: {', '.join(TASKS)}")
    return ADAPTERS[task](model.eval()).eval()


def attention_implementation(adapter: nn.Module) -> str | None:
    """The attention kernel the model runs ('sdpa', 'eager', ...), or None for a model without attention."""
    config = getattr(getattr(adapter, "model", adapter), "config", None)
    has_attention = any("Attention" in type(m).__name__ for m in adapter.modules())
    return getattr(config, "_attn_implementation", None) if has_attention and config is not None else None


@contextlib.contextmanager
def eager_attention(adapter: nn.Module):
    """Eager attention for the duration: SDPA has no double backward on CPU, which a Hessian-vector
    product needs. Only the Hessian computation uses it; everything measured runs the model's own kernel."""
    config = getattr(getattr(adapter, "model", adapter), "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous is None or previous == "eager":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def quantizable_layers(adapter: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules in network (registration) order, keyed by their name in the adapter."""
    return {name: m for name, m in adapter.named_modules() if isinstance(m, QUANTIZABLE)}
