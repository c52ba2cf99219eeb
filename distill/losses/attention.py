"""Self-attention losses for transformers, computed from the queries, keys and values of a layer.

The runner taps the query/key/value projections of the chosen blocks and hands each loss a
``(3, N, T, D)`` tensor per model (queries, keys, values stacked), plus the ``(N, T)`` token
mask. Computing attention from the projections, rather than asking the model for its attention
weights, works with every attention implementation (eager, SDPA, flash) and costs one matrix
product per head.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.traits import LossTraits

__all__ = ["AttentionKLLoss", "AttentionRelationLoss", "relation_log_probs"]


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def relation_log_probs(a: Tensor, b: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """``log softmax(a_h b_h^T / sqrt(d_h))`` for each of ``heads`` heads, padding keys masked.

    Args:
        a: ``(N, T, D)`` rows (queries for attention, or any of Q/K/V for a relation).
        b: ``(N, T, D)`` columns.
        heads: Number of heads ``D`` is split into.
        mask: ``(N, T)``, 1 for real tokens.

    Returns:
        ``(N, heads, T, T)`` log-probabilities over the last axis.
    """
    n, t, d = a.shape
    if d % heads:
        raise ValueError(f"width {d} is not divisible into {heads} heads")
    a = _upcast(a).reshape(n, t, heads, d // heads).transpose(1, 2)
    b = _upcast(b).reshape(n, t, heads, d // heads).transpose(1, 2)
    scores = a @ b.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], -1e9)
    return F.log_softmax(scores, -1)


def _row_kl(log_p: Tensor, log_q: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over heads and real query rows of ``KL(p || q)``; inputs ``(N, H, T, T)``."""
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N, H, T)
    if mask is None:
        return kl.mean()
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()


def _split(x: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"{name} needs stacked (3, N, T, D) queries/keys/values, got {tuple(x.shape)}")
    return x[0], x[1], x[2]


class AttentionKLLoss(nn.Module):
    """Attention-distribution distillation (TinyBERT, Jiao et al. 2020; DistilBERT-era "attention
    transfer" for transformers): ``KL(A_teacher || A_student)`` per head and query token, where
    ``A = softmax(Q K^T / sqrt(d_head))`` over the real (unpadded) keys.

    Student and teacher must have the same number of heads (head size may differ).

    Args:
        heads: Attention heads of both models (filled in from the models' configs by the runner).
        student_heads: The student's, when it differs from ``heads`` (an error: the maps are
            compared head by head).

    Shapes: ``(3, N, T, D_s)`` and ``(3, N, T, D_t)`` in, scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", tap="qkv", uses_mask=True)

    def __init__(self, heads: int, student_heads: int | None = None) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if student_heads is not None and student_heads != heads:
            raise ValueError(f"attention_kl compares heads one to one: the student has {student_heads} heads, the "
                             f"teacher {heads}; use attention_relation, which works across head counts")
        self.heads = heads

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        q_s, k_s, _ = _split(student_out, "attention_kl")
        q_t, k_t, _ = _split(teacher_out, "attention_kl")
        log_s = relation_log_probs(q_s, k_s, self.heads, mask)
        log_t = relation_log_probs(q_t, k_t, self.heads, mask)
        return _row_kl(log_t, log_s, mask)


class AttentionRelationLoss(nn.Module):
    """Multi-head self-attention relation distillation (MiniLMv2, Wang et al. 2021).

    For each of queries, keys and values, the scaled dot products of every token with every
    other token, split into ``heads`` relation heads and softmaxed, give a relation ``R``; the
    loss is ``KL(R_teacher || R_student)`` averaged over the chosen relations. Relation heads
    need not be the models' attention heads, so student and teacher may differ in hidden size
    and head count.

    Args:
        heads: Relation heads (each model's width must divide by it; filled in by the runner
            from the models' configs when not given).
        relations: Which of ``qq``, ``kk``, ``vv`` (MiniLMv2 uses all three); ``qk`` adds the
            attention distribution itself.

    Shapes: ``(3, N, T, D_s)`` and ``(3, N, T, D_t)`` in, scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", tap="qkv", uses_mask=True)
    _PAIRS = {"qq": (0, 0), "kk": (1, 1), "vv": (2, 2), "qk": (0, 1)}

    def __init__(self, heads: int, relations: tuple[str, ...] | list[str] = ("qq", "kk", "vv")) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        bad = [r for r in relations if r not in self._PAIRS]
        if bad or not relations:
            raise ValueError(f"relations: unknown {bad or 'empty list'}; allowed: {', '.join(self._PAIRS)}")
        self.heads = heads
        self.relations = tuple(relations)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        s, t = _split(student_out, "attention_relation"), _split(teacher_out, "attention_relation")
        total = torch.zeros((), device=student_out.device)
        for rel in self.relations:
            i, j = self._PAIRS[rel]
            log_s = relation_log_probs(s[i], s[j], self.heads, mask)
            log_t = relation_log_probs(t[i], t[j], self.heads, mask)
            total = total + _row_kl(log_t, log_s, mask)
        return total / len(self.relations)
