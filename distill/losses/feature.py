"""Feature-based losses: the student's vectors or feature maps should match the teacher's.

They compare one student tensor with one teacher tensor of the same shape; where widths differ
the runner puts a learned projector (linear, or 1x1 convolution for feature maps) on the
student side, trained with it and never saved with it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.divergence import check_pair, flat
from distill.losses.traits import LossTraits

__all__ = ["AttentionTransferLoss", "CosineLoss", "HintLoss", "MSELoss"]


def _keep(x: Tensor, mask: Tensor | None) -> Tensor:
    """Token vectors ``(N, T, D)`` at the positions where ``mask`` is set, as ``(K, D)``."""
    if mask is None or x.dim() != 3 or mask.shape != x.shape[:2]:
        return x
    return x[mask.bool()]


class MSELoss(nn.Module):
    """Mean squared error between student and teacher tensors (embeddings, hidden states, feature maps).

    With a token ``mask`` (``(N, T)``, 1 for real tokens) on ``(N, T, D)`` inputs, padding
    positions are left out.

    The mean is over every element, so on unit vectors of width ``D`` it equals
    ``2 (1 - cos) / D``: beside :class:`CosineLoss` it weighs ``1 / (D / 2)`` as much unless its
    term's weight makes up for it.

    Shapes: any equal shapes in, scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="if_needed", uses_mask=True)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        check_pair(student_out, teacher_out)
        return F.mse_loss(_keep(student_out, mask), _keep(teacher_out, mask).to(student_out.dtype))


class CosineLoss(nn.Module):
    """``1 - cos(student, teacher)`` averaged over vectors: matches direction, ignores scale.

    Shapes: ``(..., D)`` in, scalar out (in [0, 2]); padding tokens are left out as in :class:`MSELoss`.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="if_needed", uses_mask=True)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        check_pair(student_out, teacher_out)
        s, t = flat(_keep(student_out, mask)), flat(_keep(teacher_out, mask))
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


class HintLoss(MSELoss):
    """FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    The student's intermediate output goes through a learned regressor (always present, even
    when widths match: a linear map for vectors, a 1x1 convolution for feature maps) and is
    compared with the teacher's "hint" layer by mean squared error.

    Shapes: ``(N, C, H, W)`` or ``(N, ..., D)`` in (after the regressor), scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="always", uses_mask=True)


class AttentionTransferLoss(nn.Module):
    """Activation-based attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
    Attention", ICLR 2017).

    Each feature map is reduced to a spatial attention map, the mean over channels of
    ``|f|^p``, flattened and L2-normalised per example; the loss is the mean squared
    difference of the two maps. Channel counts may differ (no projector); when spatial sizes
    differ, the larger map is average-pooled to the smaller one. Token features ``(N, T, D)``
    give a map over tokens.

    Args:
        p: Exponent of the activations (2 in the paper).

    Shapes: ``(N, C, H, W)`` or ``(N, T, D)`` in, scalar out. The paper's weight of 1000
    (beta/2 with beta = 2000 on the mean) suits this scale.
    """

    traits: ClassVar[LossTraits] = LossTraits(projector="never")

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.p = p

    def _map(self, x: Tensor) -> Tensor:
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if x.dim() == 4:
            a = x.abs().pow(self.p).mean(1)
        elif x.dim() == 3:
            a = x.abs().pow(self.p).mean(-1)
        else:
            raise ValueError(f"attention transfer needs (N, C, H, W) or (N, T, D) features, got {tuple(x.shape)}")
        return a

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        a_s, a_t = self._map(student_out), self._map(teacher_out)
        if a_s.shape[0] != a_t.shape[0]:
            raise ValueError(f"batch sizes differ: {tuple(student_out.shape)} vs {tuple(teacher_out.shape)}")
        if a_s.dim() == 3 and a_s.shape != a_t.shape:
            size = (min(a_s.shape[1], a_t.shape[1]), min(a_s.shape[2], a_t.shape[2]))
            a_s = F.adaptive_avg_pool2d(a_s.unsqueeze(1), size).squeeze(1)
            a_t = F.adaptive_avg_pool2d(a_t.unsqueeze(1), size).squeeze(1)
        if a_s.shape != a_t.shape:
            raise ValueError(f"attention maps differ in shape: {tuple(a_s.shape)} vs {tuple(a_t.shape)}")
        a_s = F.normalize(a_s.flatten(1), dim=1)
        a_t = F.normalize(a_t.flatten(1), dim=1)
        return (a_s - a_t).pow(2).mean()
