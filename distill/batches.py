"""The order of the training data: global batches per epoch, each process's share, the step count
and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from distill.config import TrainSpec
from distill.errors import DataError, RecipeError
from distill.tasks import Batch

__all__ = ["ShuffledBatches", "lr_lambda", "per_process_batch", "total_steps"]


def per_process_batch(batch_size: int, processes: int) -> int:
    """Examples each process takes of a global batch of ``batch_size``.

    Raises:
        RecipeError: The global batch does not split evenly among the processes.
    """
    if batch_size % processes:
        low = batch_size - batch_size % processes
        near = sorted({max(processes, low), low + processes})
        raise RecipeError(f"train.batch_size: {batch_size} is the global batch, summed over the processes, and does "
                          f"not split evenly among {processes} processes; use a multiple of {processes} "
                          f"({' or '.join(map(str, near))})")
    return batch_size // processes


class ShuffledBatches:
    """Global batches of a dataset in a seeded order per epoch; each process takes its share of each.

    The order and the global batches do not depend on the number of processes: process ``rank``
    of ``world`` takes the ``rank``-th of ``world`` near-equal consecutive slices of every global
    batch, so the processes together see exactly the batches one process would. Each batch holds
    ``share``, this slice's size over the mean slice size: weighting the slice's mean loss by it
    makes the average over processes the global batch's mean, even for a short last batch. (A
    process left with no example there runs one example at weight 0, to stay in step.)

    With ``lengths``, examples are grouped by length inside windows of 50 batches and the
    batches are then shuffled: far less padding for text, the same randomness between windows.

    Args:
        dataset: Has ``len()`` and ``batch(indices) -> Batch``.
        batch_size: Examples per global batch, summed over the processes.
        seed: With the epoch number, fixes the order (so a resumed run sees the same batches).
        rank: This process's index.
        world: Number of processes.
        lengths: Optional size of each example, for grouping by length.
    """

    WINDOW = 50

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 lengths: Sequence[int] | None = None) -> None:
        if not len(dataset):
            raise DataError("the training set is empty (the test and validation sets held out of the data took every "
                            "example); give more data, a smaller data.eval_fraction, or separate test and dev data")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.lengths = torch.as_tensor(list(lengths)) if lengths is not None else None

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def _order(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=gen)
        if self.lengths is None:
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        window = self.WINDOW * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in shuffle]

    def share(self, indices: list[int]) -> tuple[list[int], float]:
        """This process's slice of a global batch and its loss weight."""
        size, extra = divmod(len(indices), self.world)
        start = self.rank * size + min(self.rank, extra)
        mine = indices[start : start + size + (self.rank < extra)]
        if not mine:
            return indices[:1], 0.0
        return mine, len(mine) * self.world / len(indices)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """This process's part of the global batches of ``epoch``, without the first ``skip``."""
        for indices in self._order(epoch)[skip:]:
            mine, weight = self.share(indices)
            batch = self.dataset.batch(mine)
            batch["share"] = weight
            yield batch


def total_steps(batches_per_epoch: int, spec: TrainSpec) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``epochs`` passes of ``batches_per_epoch``."""
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * batches_per_epoch / spec.grad_accum))


def lr_lambda(spec: TrainSpec, steps: int) -> Callable[[int], float]:
    """The learning-rate factor per optimizer step: linear warm-up, then the recipe's decay."""
    warmup = int(spec.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return factor
