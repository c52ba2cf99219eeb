"""Scores predicted from texts or text pairs (similarity, ratings): a one-output head trained
with mean squared error and scored by the Spearman correlation with the gold scores."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DataError
from distill.tasks.base import Batch, evaluating, spearman
from distill.tasks.classification import TextClassificationTask

__all__ = ["TextRegressionTask"]


class TextRegressionTask(TextClassificationTask):
    """A score per text or text pair (STS Benchmark's 0-5 similarity, a 1-5 rating), read from
    the labelled formats of task ``classification`` (``label_column`` holds numbers); a
    ``transformers`` classifier with one output predicts it (a cross-encoder, for pairs).

    The task loss is the mean squared error; the metric is Spearman's rank correlation of the
    predictions with the gold scores, x 100, as STS Benchmark reports it.
    """

    metric = "spearman"
    higher_is_better = True
    UNLABELLED = float("nan")

    def encode_labels(self, train: list[str], held: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
        """One output named ``score``, and each split's scores as numbers."""
        return ["score"], {"train": _scores(train, "training"), **{s: _scores(v, s) for s, v in held.items()}}

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        predicted = outputs["logits"].float()[:, 0]
        scores = batch["labels"].to(predicted.device).float()
        known = ~torch.isnan(scores)  # NaN: a text of data.mix, which only the teacher's outputs teach
        if not bool(known.all()):
            return F.mse_loss(predicted[known], scores[known]) if bool(known.any()) else predicted.sum() * 0.0
        return F.mse_loss(predicted, scores)

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        logits = outputs.get("logits")
        if logits is None or logits.dim() != 2 or logits.shape[-1] != 1:
            shape = None if logits is None else tuple(logits.shape)
            raise DataError(f"task 'regression' needs one output per example from the {role} ((N, 1) logits, "
                            f"num_labels 1), got {shape}")

    def mix_certainty(self, model: Any, limit: int = 500, batch_size: int = 64) -> None:
        """None: a score has no class probabilities to be sure of."""
        return None

    @torch.inference_mode()
    def evaluate(self, model: Any, split: str, batch_size: int = 256) -> float:
        data = self.splits[split]
        predicted = []
        with evaluating(model):
            for start in range(0, len(data), batch_size):
                batch = data.batch(range(start, min(start + batch_size, len(data))))
                predicted.append(model(batch["inputs"])["logits"][:, 0].float().cpu())
        return 100.0 * spearman(torch.cat(predicted).numpy(), data.labels.numpy())


def _scores(labels: list[str], split: str) -> np.ndarray:
    try:
        scores = np.array([float(label) for label in labels], dtype=np.float32)
    except ValueError:
        bad = next(label for label in labels if not _is_number(label))
        raise DataError(f"the {split} set has a score that is not a number: {bad!r} (task 'regression' reads "
                        "numbers in data.label_column)") from None
    if not np.isfinite(scores).all():
        raise DataError(f"the {split} set has scores that are not finite")
    return scores


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
