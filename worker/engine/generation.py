"""The speeds that matter for generation: one decoding step at batch 1 (tokens per second) and the prefill of a
prompt (time to first token). Each is a `Workload`, so the latency profile, the search and the final paired
timing all measure the one the user names (`latency`: decode by default).

A decoding step appends one token to a KV cache that already holds the prompt (`seq_len` tokens), then crops it
back, so every timed step sees the same cache length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cost

from .latency import Workload

DECODE, PREFILL = "decode", "prefill"
GENERATION_LATENCIES = (DECODE, PREFILL)


@dataclass
class Prefill(Workload):
    """The prompt (the first calibration window, batch 1) through the model with a cache: time to first token."""

    name: str = PREFILL
    unit: str = "ms per prompt"

    def call(self, model: torch.nn.Module):
        if hasattr(model, "prefilling"):  # a GGUF file in llama.cpp (llamacpp.GgufModel)
            return model.prefilling(self.example[0][0].tolist())
        causal = model.model

        def prefill():
            # The last position's logits only, as transformers' generate() asks for (and llama.cpp computes):
            # the other 63 rows of a 49k-wide vocabulary head are not part of a user's time to first token.
            return causal(input_ids=self.example[0], use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        return prefill


@dataclass
class DecodeStep(Workload):
    """One token generated after the cached prompt, at batch 1: tokens per second is 1000 / its milliseconds."""

    name: str = DECODE
    unit: str = "ms per token"

    @property
    def rows(self) -> int:
        return 1

    def call(self, model: torch.nn.Module):
        from transformers import DynamicCache

        if hasattr(model, "decoding"):  # a GGUF file in llama.cpp (llamacpp.GgufModel)
            return model.decoding(self.example[0][0].tolist())
        causal, prompt = model.model, self.example[0]
        cache = DynamicCache(config=causal.config)
        with torch.inference_mode():
            causal(input_ids=prompt, cache=cache, use_cache=True)
        cost.count("forward", len(prompt))  # the prompt's prefill, run once to set up the timed steps
        token = prompt[:, -1:]

        def step():
            out = causal(input_ids=token, cache=cache, use_cache=True).logits[:, -1].argmax(-1)
            cache.crop(-1)  # back to the prompt: every step sees the same cache
            return out
        return step


def workload(kind: str, example: tuple) -> Workload:
    """The generation workload `kind` on the first sample of `example` (a batch of token windows)."""
    prompt = (example[0][:1],)
    return (DecodeStep if kind == DECODE else Prefill)(prompt)


def kv_cache_bytes(config, tokens: int, bytes_per_value: int = 4) -> int:
    """The KV cache of one sequence of `tokens` (keys and values, every layer), computed from the config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * bytes_per_value
