"""The metric the budget is about, and the loss whose curvature ranks the layers.

| data                       | metric (evaluation and test splits)   | loss (calibration split)          |
|----------------------------|---------------------------------------|-----------------------------------|
| classifier, labels         | top-1 accuracy                        | KL(fp32 softmax || model softmax) |
|   (`analysis_loss="task"`) |                                       | cross-entropy with the labels     |
| classifier, no labels      | top-1 agreement with the fp32 model   | KL(fp32 softmax || model softmax) |
|   (`metric="logit_cosine"`)| mean cosine of the logits to fp32     | KL(fp32 softmax || model softmax) |
| embeddings                 | mean cosine to fp32 embeddings        | 1/2 squared distance to fp32      |
| language model, text       | log-likelihood per token (perplexity) | KL(fp32 next-token || model's),   |
|                            |                                       | mean over positions               |
| language model, no text    | next-token agreement with fp32        | the same KL                       |

Without labels the metric and the loss are fidelity to the fp32 model, computed once here as the
reference. The cosine of the logits is for classifiers whose top-1 answers barely vary (random weights):
it moves continuously, where agreement would stay at 1.0 until it jumps. A fidelity loss is zero with zero
gradient at the fp32 weights, so its Hessian there is exactly the Gauss-Newton matrix; `curvature_probe`
samples the output-space factor of that matrix. With labels the budget stays on top-1 accuracy, but the
layers are scored on KL to fp32 by default: on the EfficientNets it predicts each layer's measured damage
better than the cross-entropy with the labels does (docs/method.md, bench/results/simulation.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cost
from .adapters import FEATURE_EXTRACTION, TEXT_GENERATION
from .data import Batch, Dataset

LOGIT_COSINE = "logit_cosine"
LOG_LIKELIHOOD = "log_likelihood"  # per token, mean over a window; perplexity = exp(-metric)


def window_log_likelihood(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each window's next tokens (positions 1..T-1), one figure per window."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return -nll.view(len(ids), -1).mean(1)


class _References(dict):
    """The reference model's outputs per split, each computed on first use: the calibration split's only
    when a fidelity loss needs them."""

    def __init__(self, model: torch.nn.Module, evaluator: "Evaluator", analysed: torch.nn.Module):
        super().__init__()
        self.model, self.evaluator, self.analysed = model, evaluator, analysed

    def __missing__(self, split: str) -> list:
        model = self.analysed if split == "calibration" else self.model
        with torch.inference_mode():
            outputs = [self.evaluator.kept(model(*self.evaluator.inputs(b)).float(), b, split)
                       for b in getattr(self.evaluator.data, split)]
        cost.count("forward", sum(len(b[self.evaluator.input_names[0]]) for b in getattr(self.evaluator.data, split)))
        self[split] = outputs
        return outputs


class Evaluator:
    """`reference` is the float model every plan is compared against (the backend's baseline, in the
    deployed execution mode): its outputs on each split are computed once, for the fidelity metrics and
    losses, and they are also its own scores (`baseline_scores`), so the baseline is never run twice."""

    def __init__(self, reference: torch.nn.Module, data: Dataset, task: str, metric: str | None = None,
                 input_names: tuple[str, ...] | None = None, analysis_loss: str = "fidelity",
                 analysed: torch.nn.Module | None = None):
        self.input_names = input_names or reference.input_names
        self.data = data
        self.embedding = task == FEATURE_EXTRACTION
        self.generation = task == TEXT_GENERATION
        self.labelled = data.labelled and not self.embedding
        # The loss the sensitivity analysis scores layers on: fidelity to fp32, or the labels' cross-entropy.
        self.task_loss = self.labelled and analysis_loss == "task"
        self.logit_cosine = metric == LOGIT_COSINE and not self.labelled and not self.embedding
        # The analysis's loss compares with `analysed` (the float model the simulation runs in: the reference
        # itself, except where plans run outside torch, e.g. in llama.cpp).
        self.reference = _References(reference, self, analysed if analysed is not None else reference)

    @property
    def metric_name(self) -> str:
        if self.generation:
            return LOG_LIKELIHOOD if self.labelled else "next_token_agreement"
        if self.embedding:
            return "cosine_fidelity"
        if self.labelled:
            return "top1_accuracy"
        return LOGIT_COSINE if self.logit_cosine else "top1_agreement"

    @property
    def fidelity(self) -> bool:
        """The loss compares the model with its own fp32 outputs (so its Hessian is Gauss-Newton)."""
        return not self.task_loss

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(batch[name] for name in self.input_names)

    def batches(self, split: str, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        chosen = getattr(self.data, split)
        return [self.inputs(b) for b in (chosen if limit is None else chosen[:limit])]

    def kept(self, out: torch.Tensor, batch, split: str):
        """What is kept of the reference's output on a batch: all of it, except a language model's evaluation and
        test splits, where its scores and next-token choices are all that is needed (full logits of every window
        would take gigabytes)."""
        if not self.generation or split == "calibration":
            return out
        return {"scores": self._generation_scores(out, batch, None), "tokens": out.argmax(-1)}

    def _generation_scores(self, out: torch.Tensor, batch, reference) -> torch.Tensor:
        if self.labelled:
            return window_log_likelihood(out, batch["input_ids"])
        tokens = out.argmax(-1) if reference is None else reference["tokens"]
        return (out.argmax(-1) == tokens).float().mean(1)

    def _scored(self, outputs, split: str) -> list[float]:
        scores = []
        for batch, out, reference in zip(getattr(self.data, split), outputs, self.reference[split]):
            if self.generation:
                scores.append(reference["scores"] if out is reference else self._generation_scores(out, batch, reference))
            elif self.embedding or self.logit_cosine:
                scores.append(F.cosine_similarity(out, reference, dim=-1))
            else:
                target = batch["labels"] if self.labelled else reference.argmax(-1)
                scores.append((out.argmax(-1) == target).float())
        return torch.cat(scores).double().tolist()

    @torch.inference_mode()
    def scores(self, model: torch.nn.Module, split: str = "evaluation") -> list[float]:
        """The metric of every sample of a split, in order: its mean is the metric, and two models' scores
        on the same samples pair up (the drop's standard error comes from their differences)."""
        batches = getattr(self.data, split)
        # Each batch scored as it comes out: a language model's logits for a whole split would be held at once
        # otherwise (Gemma 3's 262,144-token head: 4.3 GB for 64 windows of 64 tokens).
        scores = self._scored((model(*self.inputs(batch)).float() for batch in batches), split)
        cost.count("forward", sum(len(batch[self.input_names[0]]) for batch in batches))
        return scores

    def baseline_scores(self, split: str = "evaluation") -> list[float]:
        """The reference model's own scores, from the outputs already computed."""
        return self._scored(self.reference[split], split)

    def metric(self, model: torch.nn.Module, split: str = "evaluation") -> float:
        values = self.scores(model, split)
        return sum(values) / len(values)

    @property
    def classes(self) -> int:
        """How many classes the model chooses among (the width of its output)."""
        return self.reference["evaluation"][0].shape[-1]

    @torch.inference_mode()
    def distinct_predictions(self, split: str = "evaluation") -> int:
        """How many classes the fp32 model predicts on a split: a top-1 metric needs several to mean anything."""
        return len(torch.cat([r.argmax(-1) for r in self.reference[split]]).unique())

    def batch_loss(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        batch = self.data.calibration[index]
        return self.loss_of_output(model(*self.inputs(batch)), index)

    def loss_of_output(self, out: torch.Tensor, index: int) -> torch.Tensor:
        """The loss of calibration batch `index` given the model's output for it."""
        reference = self.reference["calibration"][index]
        out = out.float()
        if self.embedding:
            return 0.5 * (out - reference).pow(2).sum(-1).mean()
        if self.task_loss:
            if self.generation:
                return -window_log_likelihood(out, self.data.calibration[index]["input_ids"]).mean()
            return F.cross_entropy(out, self.data.calibration[index]["labels"])
        # Per next-token distribution (a language model has one per position), averaged over them.
        return F.kl_div(F.log_softmax(out.flatten(0, -2), -1), F.log_softmax(reference.flatten(0, -2), -1),
                        log_target=True, reduction="batchmean")

    def loss(self, model: torch.nn.Module, batches: int | None = None) -> torch.Tensor:
        """Mean loss over the first `batches` calibration batches (all by default); differentiable."""
        n = self.calibration_batches(batches)
        return sum(self.batch_loss(model, i) for i in range(n)) / n

    @torch.no_grad()
    def loss_value(self, model: torch.nn.Module, batches: int | None = None) -> float:
        return float(self.loss(model, batches))

    def calibration_batches(self, batches: int | None) -> int:
        total = len(self.data.calibration)
        return total if batches is None else min(batches, total)

    def curvature_probe(self, index: int, scale: float, generator: torch.Generator) -> torch.Tensor:
        """A random u with E[u uᵀ] = scale² · ∂²loss_index/∂out² at the fp32 outputs (fidelity losses only).

        Then Jᵀu (one ordinary backward of <out, u>) has E‖Jᵀu‖² = scale² · Tr(Jᵀ ∂²loss/∂out² J): the
        Gauss-Newton trace, which for a fidelity loss at the fp32 weights is the exact Hessian trace.
        """
        reference = self.reference["calibration"][index]
        rows = len(reference)
        if self.embedding:  # loss = 1/2 mean_s ||out_s - ref_s||²: Hessian I / rows
            u = torch.randint(0, 2, reference.shape, generator=generator).float() * 2 - 1
        else:  # KL(p0 || softmax(out)) / rows at out = ref: Hessian (diag(p) - p pᵀ) / rows,
            # which is E[(e_y - p)(e_y - p)ᵀ] / rows for y drawn from p; a language model has a row per position.
            p = reference.float().cpu().flatten(0, -2).softmax(-1)  # drawn on the CPU generator, wherever it runs
            rows = len(p)
            drawn = torch.multinomial(p, 1, generator=generator).squeeze(1)
            u = (F.one_hot(drawn, p.shape[-1]).float() - p).view(reference.shape)
        return (u * (scale / rows ** 0.5)).to(reference.device)
