"""Relation-based losses: the student should relate the examples of a batch as the teacher does.

They compare ``N x N`` (or ``N x N x N``) structures built separately from each model's
outputs, so student and teacher widths may differ and no projector is needed. Any output can
be used: embeddings, logits, or a layer's features (flattened per example).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.divergence import check_pair, flat
from distill.losses.traits import LossTraits

__all__ = [
    "CRDLoss", "ContrastiveLoss", "RKDAngleLoss", "RKDDistanceLoss", "SimilarityLoss", "SimilarityPreservingLoss",
]


def _rows(x: Tensor) -> Tensor:
    """``(N, ...)`` to ``(N, D)``; half precision is upcast."""
    x = x.reshape(x.shape[0], -1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _same_batch(student: Tensor, teacher: Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
                         "differ in batch size")


class SimilarityLoss(nn.Module):
    """In-batch cosine-similarity distillation for embedding models: the student's pairwise cosine
    similarities between the examples of a batch should equal the teacher's (mean squared error
    of the two ``N x N`` matrices).

    Shapes: ``(N, D_s)`` and ``(N, D_t)`` in, scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", in_batch=True)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        s = F.normalize(flat(student_out), dim=-1)
        t = F.normalize(flat(teacher_out), dim=-1).to(s.dtype)
        return F.mse_loss(s @ s.T, t @ t.T)


class ContrastiveLoss(nn.Module):
    """In-batch contrastive distillation: each student embedding must pick out the teacher's
    embedding of the same example among the teacher's embeddings of the whole batch, and each
    teacher embedding its student's (symmetric InfoNCE over cosine similarities divided by
    ``temperature``, as in SimCSE's objective with the teacher's outputs as the positives).

    Unlike :class:`SimilarityLoss`, it does not ask the student to reproduce every similarity,
    only to be nearer its own target than any other in the batch: what tells sentences apart
    counts, however little of the teacher's variance it carries. Both sides must have the same
    width (a projector or ``projector: pca`` where they differ).

    Args:
        temperature: Softmax temperature (SimCSE uses 0.05).

    Shapes: ``(N, D)`` and ``(N, D)`` in, scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="if_needed", in_batch=True)

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive needs temperature > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        check_pair(student_out, teacher_out)
        s = F.normalize(_rows(student_out), dim=-1)
        t = F.normalize(_rows(teacher_out), dim=-1).to(s.dtype)
        logits = s @ t.T / self.temperature
        target = torch.arange(len(s), device=s.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    Each model's activations ``A`` (``N x D`` after flattening) give ``G = A A^T`` with each row
    L2-normalised; the loss is ``||G_s - G_t||_F^2 / N^2``.

    Shapes: ``(N, ...)`` and ``(N, ...)`` in (any widths), scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", in_batch=True)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        s, t = _rows(student_out), _rows(teacher_out)
        g_s = F.normalize(s @ s.T, dim=1)
        g_t = F.normalize(t @ t.T, dim=1)
        n = s.shape[0]
        return (g_s - g_t).pow(2).sum() / (n * n)


class RKDDistanceLoss(nn.Module):
    """Relational KD, distance-wise (Park et al., "Relational Knowledge Distillation", CVPR 2019).

    Pairwise Euclidean distances of each model's outputs, divided by their mean over distinct
    pairs (so the loss is invariant to the scale of either space), compared by the Huber loss.
    The paper weights this term 25.

    Shapes: ``(N, ...)`` and ``(N, ...)`` in (any widths), scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", in_batch=True)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        d_s, d_t = _normalised_distances(_rows(student_out)), _normalised_distances(_rows(teacher_out))
        return F.smooth_l1_loss(d_s, d_t)


def _normalised_distances(x: Tensor) -> Tensor:
    d = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1).clamp(min=1e-12).sqrt()
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d = d * off
    return d / d[off].mean().clamp(min=1e-12)


class RKDAngleLoss(nn.Module):
    """Relational KD, angle-wise (Park et al., CVPR 2019).

    For every triplet ``(i, j, k)``, the cosine of the angle at ``j`` between ``x_i - x_j`` and
    ``x_k - x_j``; student and teacher angles are compared by the Huber loss. Invariant to
    scale, translation and rotation of either space. The paper weights this term 50. Costs
    ``N^3`` memory per batch.

    Shapes: ``(N, ...)`` and ``(N, ...)`` in (any widths), scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", in_batch=True)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        return F.smooth_l1_loss(_angles(_rows(student_out)), _angles(_rows(teacher_out)))


def _angles(x: Tensor) -> Tensor:
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(x_i - x_j)
    return (e @ e.transpose(1, 2)).flatten()  # [j, i, k] = cos of the angle at j


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

    Student and teacher representations are embedded by two learned heads into a shared
    ``dim``-wide unit sphere; each student embedding must pick out the teacher embedding of the
    same example among ``negatives`` teacher embeddings of other examples drawn from a memory
    bank (and symmetrically). The memory banks hold one slowly updated embedding per training
    example (momentum ``momentum``), so many negatives cost no extra forward passes. The
    objective is the softmax (InfoNCE) form of the paper's contrastive bound.

    The heads and memory banks are trained and checkpointed with the student and left out of the
    saved model. The runner fills ``num_examples`` (the training-set size) and the two widths.

    Args:
        student_dim: Width of the student representation (after flattening).
        teacher_dim: Width of the teacher representation.
        num_examples: Training examples (rows of each memory bank).
        dim: Width of the shared embedding.
        negatives: Negatives per example.
        temperature: Softmax temperature.
        momentum: Memory-bank update rate (share of the old value kept).

    Shapes: ``(N, ...)`` and ``(N, ...)`` in, with ``index`` (``(N,)`` example indices); scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never", uses_index=True, trainable=True)

    def __init__(self, student_dim: int, teacher_dim: int, num_examples: int, dim: int = 128,
                 negatives: int = 4096, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if negatives < 1 or num_examples < 2:
            raise ValueError(f"crd needs negatives >= 1 and at least 2 examples, got {negatives}, {num_examples}")
        if temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"crd needs temperature > 0 and momentum in [0, 1), got {temperature}, {momentum}")
        self.embed_s = nn.Linear(student_dim, dim)
        self.embed_t = nn.Linear(teacher_dim, dim)
        self.negatives, self.temperature, self.momentum = negatives, temperature, momentum
        bank = F.normalize(torch.randn(2, num_examples, dim), dim=-1)
        self.register_buffer("memory_s", bank[0].clone())
        self.register_buffer("memory_t", bank[1].clone())

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None,
                index: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        if index is None:
            raise ValueError("crd needs the example indices of the batch (index=)")
        s = F.normalize(self.embed_s(_rows(student_out)), dim=-1)
        t = F.normalize(self.embed_t(_rows(teacher_out).to(s.dtype)), dim=-1)
        index = index.to(s.device)
        k = min(self.negatives, self.memory_s.shape[0] - 1)
        # Negatives: random other examples (an index equal to the anchor is shifted by one).
        neg = torch.randint(0, self.memory_s.shape[0] - 1, (s.shape[0], k), device=s.device)
        neg = neg + (neg >= index[:, None]).long()
        loss = self._nce(s, t, self.memory_t[neg]) + self._nce(t, s, self.memory_s[neg])
        if self.training:
            with torch.no_grad():
                for bank, new in ((self.memory_s, s), (self.memory_t, t)):
                    bank[index] = F.normalize(self.momentum * bank[index] + (1 - self.momentum) * new.detach(),
                                              dim=-1)
        return loss / 2

    def _nce(self, anchor: Tensor, positive: Tensor, negatives: Tensor) -> Tensor:
        pos = (anchor * positive).sum(-1, keepdim=True)
        neg = torch.einsum("nd,nkd->nk", anchor, negatives.to(anchor.dtype))
        logits = torch.cat([pos, neg], 1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))
