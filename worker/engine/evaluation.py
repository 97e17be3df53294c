"""The metric the budget is about, and the loss whose curvature ranks the layers.

| data                       | metric (evaluation and test splits)   | loss (calibration split)          |
|----------------------------|---------------------------------------|-----------------------------------|
| classifier, labels         | top-1 accuracy                        | cross-entropy with the labels     |
| classifier, no labels      | top-1 agreement with the fp32 model   | KL(fp32 softmax || model softmax) |
|   (`metric="logit_cosine"`)| mean cosine of the logits to fp32     | KL(fp32 softmax || model softmax) |
| embeddings                 | mean cosine to fp32 embeddings        | 1/2 squared distance to fp32      |

Without labels the metric and the loss are fidelity to the fp32 model, computed once here as the
reference. The cosine of the logits is for classifiers whose top-1 answers barely vary (random weights):
it moves continuously, where agreement would stay at 1.0 until it jumps. A fidelity loss is zero with zero gradient at the fp32 weights, so its Hessian there is
exactly the Gauss-Newton matrix; `curvature_probe` samples the output-space factor of that matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import FEATURE_EXTRACTION, ModelAdapter
from .data import SPLITS, Batch, Dataset

LOGIT_COSINE = "logit_cosine"


class Evaluator:
    def __init__(self, adapter: ModelAdapter, data: Dataset, task: str, metric: str | None = None):
        self.input_names = adapter.input_names
        self.data = data
        self.embedding = task == FEATURE_EXTRACTION
        self.labelled = data.labelled and not self.embedding
        self.logit_cosine = metric == LOGIT_COSINE and not self.labelled and not self.embedding
        with torch.inference_mode():
            self.reference = {split: [adapter(*self.inputs(b)).float() for b in getattr(data, split)]
                              for split in SPLITS}

    @property
    def metric_name(self) -> str:
        if self.embedding:
            return "cosine_fidelity"
        if self.labelled:
            return "top1_accuracy"
        return LOGIT_COSINE if self.logit_cosine else "top1_agreement"

    @property
    def fidelity(self) -> bool:
        """The loss compares the model with its own fp32 outputs (so its Hessian is Gauss-Newton)."""
        return not self.labelled

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(batch[name] for name in self.input_names)

    def batches(self, split: str, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        chosen = getattr(self.data, split)
        return [self.inputs(b) for b in (chosen if limit is None else chosen[:limit])]

    @torch.inference_mode()
    def metric(self, model: torch.nn.Module, split: str = "evaluation") -> float:
        total, count = 0.0, 0
        for batch, reference in zip(getattr(self.data, split), self.reference[split]):
            out = model(*self.inputs(batch)).float()
            if self.embedding or self.logit_cosine:
                total += F.cosine_similarity(out, reference, dim=-1).sum().item()
            else:
                target = batch["labels"] if self.labelled else reference.argmax(-1)
                total += (out.argmax(-1) == target).sum().item()
            count += len(out)
        return total / count

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
        if self.labelled:
            return F.cross_entropy(out, self.data.calibration[index]["labels"])
        return F.kl_div(F.log_softmax(out, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean")

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
            # which is E[(e_y - p)(e_y - p)ᵀ] / rows for y drawn from p.
            p = reference.float().cpu().softmax(-1)  # sampled on the CPU generator, wherever the model runs
            drawn = torch.multinomial(p, 1, generator=generator).squeeze(1)
            u = F.one_hot(drawn, p.shape[-1]).float() - p
        return (u * (scale / rows ** 0.5)).to(reference.device)
