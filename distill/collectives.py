"""Collectives the losses need across processes, with gradients (plain ``torch.distributed``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_rows", "world_size"]


def world_size() -> int:
    """Processes in the default group (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """Every process's rows, concatenated in rank order; the gradient flows back to each process's own.

    Slices may differ in size (a short last batch). Each process computes the same loss on the
    gathered rows, so the gradient of its own rows is the sum of every process's copy: one
    all-reduce, then this process's slice.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        size = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts, ctx.rank = counts, dist.get_rank()  # type: ignore[attr-defined]
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        counts, rank = ctx.counts, ctx.rank  # type: ignore[attr-defined]
        start = sum(counts[:rank])
        return grad[start : start + counts[rank]]


def gather_rows(x: Tensor) -> Tensor:
    """``x``'s rows from every process, in rank order (``x`` itself in one process); differentiable."""
    if world_size() == 1:
        return x
    return _GatherRows.apply(x)
