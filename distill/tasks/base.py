"""What every task gives the engine: the batch layout and the :class:`Task` protocol."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["Batch", "Task", "TextBlocks", "evaluating", "higher_is_better", "spearman"]

#: A batch: ``index`` (positions in the training set, for the cache), ``inputs`` for the
#: adapters, ``labels`` for the task loss (or ``None``).
Batch = dict[str, Any]


class Task(Protocol):
    """What the engine and the evaluator need from a task."""

    output: str
    """Named model output that distillation compares and evaluation scores."""
    metric: str
    """Name of the quality metric (higher is better unless the task sets ``higher_is_better = False``:
    :func:`higher_is_better`)."""
    train: Any
    """Training set: ``len()`` and ``batch(indices) -> Batch``."""

    def fingerprint(self) -> str:
        """Hash of the training inputs, for the teacher cache."""
        ...

    def task_loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        """The task's own loss on labels (used alone by the baseline)."""
        ...

    def evaluate(self, model: Any, split: str, batch_size: int = 64) -> float | None:
        """Quality of ``model`` (an adapter) on ``eval`` or ``test``; ``None`` when there is no
        data to evaluate on."""
        ...

    def sample_inputs(self, n: int) -> dict[str, Any]:
        """``n`` real test inputs, for timing."""
        ...

    def lengths(self) -> Sequence[int]:
        """A size per training example; the cache batches similar sizes together."""
        ...

    def check_outputs(self, outputs: dict[str, Tensor], role: str) -> None:
        """Raise a clear error when a model's outputs do not fit the task (wrong label set)."""
        ...


def higher_is_better(task: Any) -> bool:
    """Whether a larger value of ``task``'s metric is better: a task whose metric falls as the
    model improves (perplexity) says so with ``higher_is_better = False``."""
    return bool(getattr(task, "higher_is_better", True))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2.0)[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation, ties given their average rank (as ``scipy.stats.spearmanr``).

    Returns NaN when either side is constant, where the correlation is undefined.

    Raises:
        ValueError: Inputs of different lengths, fewer than two values, or values that are not finite.
    """
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equally long arrays of 2 or more values, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman needs finite values")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


class TextBlocks:
    """Texts as a data set (blocks of a corpus, or sentences): a batch is ``{"text": [...]}``
    with no labels (a language model's targets are the texts' own next tokens; an embedding
    student's are the teacher's outputs)."""

    def __init__(self, blocks: list[str]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def batch(self, indices: Sequence[int]) -> Batch:
        return {"index": torch.as_tensor(list(indices), dtype=torch.long),
                "inputs": {"text": [self.blocks[i] for i in indices]}, "labels": None}

    def items(self) -> list[Any]:
        return self.blocks


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """An adapter's model in eval mode for the block, its training mode put back after (however
    the block ends): what every evaluation runs under."""
    was_training = model.module.training
    model.module.eval()
    try:
        yield
    finally:
        model.module.train(was_training)
