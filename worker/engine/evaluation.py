"""The metric the budget is about, and the loss whose curvature ranks the layers.

| data                       | metric (evaluation split)             | loss (calibration split)          |
|----------------------------|---------------------------------------|-----------------------------------|
| classifier, labels         | top-1 accuracy                        | cross-entropy with the labels     |
| classifier, no labels      | top-1 agreement with the fp32 model   | KL(fp32 softmax || model softmax) |
| embeddings                 | mean cosine to fp32 embeddings        | 1/2 squared distance to fp32      |

Without labels both are fidelity to the fp32 model, computed once here as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import FEATURE_EXTRACTION, ModelAdapter
from .data import Batch, Dataset


class Evaluator:
    def __init__(self, adapter: ModelAdapter, data: Dataset, task: str):
        self.input_names = adapter.input_names
        self.data = data
        self.embedding = task == FEATURE_EXTRACTION
        self.labelled = data.labelled and not self.embedding
        with torch.inference_mode():
            self.reference = {
                split: [adapter(*self.inputs(b)).float() for b in getattr(data, split)]
                for split in ("calibration", "evaluation")
            }

    @property
    def metric_name(self) -> str:
        if self.embedding:
            return "cosine_fidelity"
        return "top1_accuracy" if self.labelled else "top1_agreement"

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(batch[name] for name in self.input_names)

    @torch.inference_mode()
    def metric(self, model: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for batch, reference in zip(self.data.evaluation, self.reference["evaluation"]):
            out = model(*self.inputs(batch)).float()
            if self.embedding:
                total += F.cosine_similarity(out, reference, dim=-1).sum().item()
            else:
                target = batch["labels"] if self.labelled else reference.argmax(-1)
                total += (out.argmax(-1) == target).sum().item()
            count += len(out)
        return total / count

    def batch_loss(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        batch = self.data.calibration[index]
        reference = self.reference["calibration"][index]
        out = model(*self.inputs(batch)).float()
        if self.embedding:
            return 0.5 * (out - reference).pow(2).sum(-1).mean()
        if self.labelled:
            return F.cross_entropy(out, batch["labels"])
        return F.kl_div(F.log_softmax(out, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean")

    def loss(self, model: torch.nn.Module, batches: int | None = None) -> torch.Tensor:
        """Mean loss over the first `batches` calibration batches (all by default); differentiable."""
        n = len(self.data.calibration) if batches is None else min(batches, len(self.data.calibration))
        return sum(self.batch_loss(model, i) for i in range(n)) / n

    @torch.no_grad()
    def loss_value(self, model: torch.nn.Module, batches: int | None = None) -> float:
        return float(self.loss(model, batches))
