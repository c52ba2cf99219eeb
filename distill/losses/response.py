"""Response-based losses: the student's output distribution should match the teacher's.

Logit losses take ``(..., C)`` tensors: every leading position is one distribution and the
result is the mean over positions, so the same modules serve classifiers ``(N, C)`` and
token-level language models ``(N, T, C)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.divergence import check_pair, divergence, flat, kl, log_probs, temperature_scale
from distill.losses.traits import LossTraits

__all__ = ["DKDLoss", "JSDLoss", "KDLoss", "ReverseKLLoss", "TVDLoss", "kl_divergence"]


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over rows of KL(p || q) for ``(N, C)`` log-probabilities."""
    return kl(log_p, log_q).mean()


class _TemperedLoss(nn.Module):
    """Base of the logit losses: one divergence (``kind``) of the two tempered distributions,
    computed by :func:`~distill.losses.divergence.token_divergence` and averaged over rows."""

    traits: ClassVar[LossTraits] = LossTraits(output="logits")
    kind: ClassVar[str]

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        check_pair(student_out, teacher_out)
        t = self.temperature
        log_s, log_t = log_probs(flat(student_out), t), log_probs(flat(teacher_out), t)
        return divergence(log_s, log_t, self.kind, 0.5, 0.1).mean() * temperature_scale(self.kind, t)


class KDLoss(_TemperedLoss):
    """Hinton knowledge distillation: ``T^2 * KL(p_teacher^T || p_student^T)``.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015. The ``T^2``
    factor keeps gradient magnitudes comparable across temperatures.

    Args:
        temperature: Softmax temperature applied to both sets of logits.

    Shapes: ``student_out`` and ``teacher_out`` are ``(..., C)`` logits; returns a scalar.
    """

    kind = "forward_kl"


class ReverseKLLoss(_TemperedLoss):
    """Reverse KL ``T^2 * KL(p_student || p_teacher)``: mode-seeking (Gu et al., MiniLLM, 2023).

    Args:
        temperature: Softmax temperature applied to both sets of logits.

    Shapes: ``(..., C)`` logits in, scalar out.
    """

    kind = "reverse_kl"


class JSDLoss(nn.Module):
    """Generalized Jensen-Shannon divergence (Agarwal et al., GKD, 2024).

    With ``P`` the teacher, ``Q`` the student and ``M = beta*P + (1-beta)*Q``:
    ``JSD_beta = beta*KL(P || M) + (1-beta)*KL(Q || M)``. As beta -> 0, ``JSD_beta / beta``
    tends to forward ``KL(P || Q)``; as beta -> 1, ``JSD_beta / (1-beta)`` tends to reverse
    ``KL(Q || P)``. At exactly 0 and 1 the loss *is* forward and reverse KL, so one knob moves
    between the three.

    Args:
        beta: Mixture weight in [0, 1]; 0.5 is the symmetric JSD.
        temperature: Softmax temperature applied to both sets of logits.

    Shapes: ``(..., C)`` logits in, scalar out.
    """

    traits: ClassVar[LossTraits] = LossTraits(output="logits")

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.beta = beta
        self.temperature = temperature

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        check_pair(student_out, teacher_out)
        t = self.temperature
        log_s, log_t = log_probs(flat(student_out), t), log_probs(flat(teacher_out), t)
        return divergence(log_s, log_t, "jsd", self.beta, 0.1).mean() * t * t


class TVDLoss(_TemperedLoss):
    """Total variation distance ``0.5 * sum |p_teacher - p_student|`` (Wen et al., f-divergence KD, 2023).

    Args:
        temperature: Softmax temperature applied to both sets of logits.

    Shapes: ``(..., C)`` logits in, scalar out (in [0, 1]).
    """

    kind = "tvd"


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

    Splits KD into target-class KD (binary: target vs the rest) and non-target-class KD (the
    distribution over the other classes), weighted independently:
    ``T^2 * (alpha * TCKD + beta * NCKD)``.

    Args:
        alpha: Weight of the target-class term.
        beta: Weight of the non-target-class term (8 in the paper for CIFAR-100).
        temperature: Softmax temperature.

    Shapes: ``(N, C)`` logits and ``(N,)`` integer labels in, scalar out. Labels are required; a
    row labelled -1 (unlabelled) takes the teacher's top class as its target.
    """

    traits: ClassVar[LossTraits] = LossTraits(output="logits")

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None) -> Tensor:
        check_pair(student_out, teacher_out)
        if labels is None:
            raise ValueError("dkd needs class labels; use it on a labelled classification task")
        t = self.temperature
        s, te = flat(student_out) / t, flat(teacher_out) / t
        labels = labels.reshape(-1).long()
        # An unlabelled example (-1: a text of data.mix) takes the teacher's top class as its target.
        labels = torch.where(labels < 0, te.argmax(-1), labels)
        target = F.one_hot(labels, s.shape[-1]).bool()
        tckd = kl_divergence(_binary_log_probs(te, target), _binary_log_probs(s, target))
        # Masking the target with a large negative logit leaves the softmax over the rest.
        log_nt_s = F.log_softmax(s.masked_fill(target, -1e4), -1)
        log_nt_t = F.log_softmax(te.masked_fill(target, -1e4), -1)
        nckd = kl_divergence(log_nt_t, log_nt_s)
        return (self.alpha * tckd + self.beta * nckd) * t * t


def _binary_log_probs(logits: Tensor, target: Tensor) -> Tensor:
    """Log of ``[p_target, 1 - p_target]`` for each row, computed stably from logits."""
    log_p = F.log_softmax(logits, -1)
    log_target = log_p.masked_fill(~target, float("-inf")).logsumexp(-1)
    log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(-1)
    return torch.stack([log_target, log_rest], -1)
