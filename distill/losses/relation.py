"""Relation-based losses: the student should relate the examples of a batch as the teacher does.

They compare ``N x N`` (or ``N x N x N``) structures built separately from each model's
outputs, so student and teacher widths may differ and no projector is needed. Any output can
be used: embeddings, logits, or a layer's features (flattened per example).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.response import flat

__all__ = ["RKDAngleLoss", "RKDDistanceLoss", "SimilarityLoss", "SimilarityPreservingLoss"]


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

    projector = "never"

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        s = F.normalize(flat(student_out), dim=-1)
        t = F.normalize(flat(teacher_out), dim=-1).to(s.dtype)
        return F.mse_loss(s @ s.T, t @ t.T)


class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    Each model's activations ``A`` (``N x D`` after flattening) give ``G = A A^T`` with each row
    L2-normalised; the loss is ``||G_s - G_t||_F^2 / N^2``.

    Shapes: ``(N, ...)`` and ``(N, ...)`` in (any widths), scalar out.
    """

    projector = "never"

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

    projector = "never"

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

    projector = "never"

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        _same_batch(student_out, teacher_out)
        return F.smooth_l1_loss(_angles(_rows(student_out)), _angles(_rows(teacher_out)))


def _angles(x: Tensor) -> Tensor:
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(x_i - x_j)
    return (e @ e.transpose(1, 2)).flatten()  # [j, i, k] = cos of the angle at j
