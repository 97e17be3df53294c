"""What a job will cost, from its request alone: checked at submission, before a worker loads anything.

Each field of a request is capped, but not their product: 100k samples of synthetic 224x224 images are
120 GB before the first forward pass. Two estimates bound a job:

- memory: the inputs held for every sample (calibration, evaluation and test), plus one batch's
  attention scores for text models; a builtin's input shape is known; another model's image size comes
  from its config (`image_shape`, read by the API from the Hub or the model root before it accepts the
  job, and by the worker again before it allocates anything); without a config, 3x224x224 images or
  `seq_len` tokens, whichever costs more;
  a causal language model also holds next-token logits (sequence length x vocabulary): in flight for a batch,
  and kept for every calibration window (the KL its layers are scored on);
- work: sample forward passes, summed over the phases that scale with the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .catalogue import BUILTIN_INPUTS
from .errors import InputError
from .search import REFINEMENT_STEPS, max_evaluations

DEFAULT_IMAGE = (3, 224, 224)
ATTENTION_HEADS = 12  # BERT-base's: the attention-score term of a batch
HESSIAN_BATCHES = 2  # calibration batches the Hessian trace averages over
LOGIT_COPIES = 4  # a batch's logits, their log-softmax, the reference's and a gradient, at once
HESSIAN_PASSES = 3  # a Hessian-vector product costs about a forward and two backward passes
# Baseline, bisection over up to 512 candidate layers with refinement, and the final plan.
SEARCH_EVALUATIONS = max_evaluations(512, REFINEMENT_STEPS) + 2


@dataclass(frozen=True)
class JobSize:
    memory_bytes: int
    sample_passes: int


def _positive_int(value, field: str) -> int:
    """A config's integer field, or an InputError naming it (a hostile config must be a 4xx, never a 500)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"the model's config.json has {field} = {str(value)[:40]!r}: expected a positive integer")
    return value


def _object(config) -> dict:
    if not isinstance(config, dict):
        raise InputError(f"the model's config.json is a JSON {type(config).__name__}, not an object")
    return config


def image_shape(config) -> tuple[int, int, int] | None:
    """(channels, height, width) from a transformers config, for models that take images; None otherwise. The
    size is an integer, [height, width] or {"height", "width"}; anything else is an InputError naming the field."""
    size = _object(config).get("image_size")
    if size is None:
        return None
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
    elif isinstance(size, list) and len(size) == 2:
        height, width = size
    else:
        height = width = size
    channels = config.get("num_channels", 3)
    return (_positive_int(channels, "num_channels"), _positive_int(height, "image_size"),
            _positive_int(width, "image_size"))


def image_bytes(samples: int, shape: tuple[int, ...]) -> int:
    return samples * math.prod(shape) * 4  # float32 pixels


def vocabulary(config) -> int | None:
    """A causal language model's vocabulary size from its config; None for other models."""
    architectures = _object(config).get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise InputError("the model's config.json has architectures that are not a list of names")
    if any(a.endswith("ForCausalLM") for a in architectures):
        return _positive_int(config.get("vocab_size"), "vocab_size")
    return None


def logits_bytes(calibration_samples: int, batch_size: int, seq_len: int, vocab: int) -> int:
    """float32 next-token logits: LOGIT_COPIES batches in flight, and the calibration windows' references."""
    return (LOGIT_COPIES * batch_size + calibration_samples) * seq_len * vocab * 4


def estimate(request: dict, shape: tuple[int, ...] | None = None, vocab: int | None = None) -> JobSize:
    samples = request["calibration_samples"] + request["eval_samples"] + request["test_samples"]
    batch, seq_len = request["batch_size"], request["seq_len"]
    kind, shape = BUILTIN_INPUTS.get(request["model"].removeprefix("builtin:"),
                                     ("image", shape) if shape else ("causal", (vocab,)) if vocab else
                                     (None, DEFAULT_IMAGE))
    text = samples * seq_len * 2 * 8 + batch * ATTENTION_HEADS * seq_len ** 2 * 4  # int64 ids and mask
    if kind == "causal":
        memory = text + logits_bytes(request["calibration_samples"], batch, seq_len, shape[0])
    else:
        image = image_bytes(samples, shape)
        memory = image if kind == "image" else text if kind == "text" else max(image, text)
    passes = (request["calibration_samples"] + SEARCH_EVALUATIONS * request["eval_samples"]
              + 2 * request["test_samples"]
              + HESSIAN_PASSES * request["hutchinson_samples"] * HESSIAN_BATCHES * batch)
    return JobSize(memory, passes)


def check(request: dict, max_memory_bytes: int, max_sample_passes: int,
          shape: tuple[int, ...] | None = None, vocab: int | None = None) -> JobSize:
    """The estimate, or an InputError saying which limit it passes and what to lower."""
    size = estimate(request, shape, vocab)
    check_memory(size.memory_bytes, max_memory_bytes)
    if size.sample_passes > max_sample_passes:
        raise InputError(f"this job would run about {size.sample_passes:,} sample forward passes, over the limit "
                         f"of {max_sample_passes:,}: lower eval_samples (each search step scores all of them), "
                         "or hutchinson_samples and batch_size")
    return size


def check_memory(needed: int, limit: int | None) -> None:
    if limit is not None and needed > limit:
        raise InputError(f"this job would hold about {needed / 2**30:.1f} GiB of inputs, over the limit of "
                         f"{limit / 2**30:.1f} GiB: lower calibration_samples, eval_samples or test_samples (or "
                         "batch_size and seq_len for text models; a language model's logits grow with seq_len x vocabulary)")
