"""The divergences between two next-token (or class) distributions: one implementation.

Every response-based loss goes through these functions, the class-logit losses of
:mod:`distill.losses.response` and the chunked token losses of :mod:`distill.losses.chunked`
alike, so the two cannot drift apart. All work on ``(N, C)`` rows of log-probabilities and
return one value per row; the callers reduce.

Divergences (``kind``), with P the teacher's and Q the student's distribution:

``forward_kl``       KL(P || Q), mean-seeking (Hinton KD).
``reverse_kl``       KL(Q || P), mode-seeking (MiniLLM, Gu et al. 2023).
``jsd``              generalized JSD with ``beta`` (GKD, Agarwal et al. 2024): 0 and 1 are forward and reverse KL.
``skew_kl``          KL(P || alpha P + (1 - alpha) Q) (DistiLLM, Ko et al. 2024).
``skew_reverse_kl``  KL(Q || alpha Q + (1 - alpha) P) (DistiLLM).
``tvd``              total variation, 0.5 * sum |P - Q|.

``top_k`` / ``top_p`` restrict the comparison to the teacher's most likely tokens: both
distributions keep their probabilities on those tokens and pool the rest into one "other"
bucket, so the mass outside the kept tokens is accounted for, not dropped or renormalised
away. The same form serves a cache of the teacher's top-k log-probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "check_divergence",
    "check_pair",
    "divergence",
    "divergence_and_grad",
    "flat",
    "kl",
    "log_probs",
    "mix",
    "restrict",
    "sparse_token_divergence",
    "temperature_scale",
    "token_divergence",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def flat(x: Tensor) -> Tensor:
    """``(..., C)`` to ``(N, C)``; half precision is upcast so that softmax and logs stay accurate."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def temperature_scale(kind: str, temperature: float) -> float:
    """``T^2`` keeps the gradients' scale across temperatures (Hinton et al.); TVD is bounded, unscaled."""
    return 1.0 if kind == "tvd" else temperature**2


def check_pair(student: Tensor, teacher: Tensor) -> None:
    """Raise ``ValueError`` unless the two outputs have one shape."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
            "differ in shape"
        )


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) of log-probabilities that are finite (see :func:`log_probs`): where
    p underflows to 0 the term is 0, with no masking tensor to hold."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Tempered log-softmax, with ``-inf`` (a model's banned tokens) raised to the lowest finite
    value so that ``0 * log 0`` terms stay 0 rather than NaN."""
    log = F.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
    return log.clamp_min(torch.finfo(log.dtype).min)


def mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stably."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def restrict(log_s: Tensor, log_t: Tensor, top_k: int | None, top_p: float | None) -> tuple[Tensor, Tensor]:
    """Keep the teacher's top-k / top-p tokens and pool every other token into one last column."""
    keep = torch.ones_like(log_t, dtype=torch.bool)
    if top_k is not None and top_k < log_t.shape[-1]:
        keep = torch.zeros_like(keep).scatter_(-1, log_t.topk(top_k, dim=-1).indices, True)
    if top_p is not None:
        sorted_log, order = log_t.sort(-1, descending=True)
        before = sorted_log.exp().cumsum(-1) - sorted_log.exp()  # mass of the tokens ranked above
        keep &= torch.zeros_like(keep).scatter_(-1, order, before < top_p)
    neg = torch.finfo(log_t.dtype).min

    def pooled(log: Tensor) -> Tensor:
        rest = log.masked_fill(keep, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(neg)
        return torch.cat([log.masked_fill(~keep, neg), rest], -1)

    return pooled(log_s), pooled(log_t)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Divergence between student and teacher next-token distributions, one value per row.

    Args:
        student_logits: ``(N, V)`` logits.
        teacher_logits: ``(N, V)`` logits.
        kind: One of :data:`DIVERGENCES`.
        temperature: Softens both distributions; the result is scaled by ``T^2``.
        beta: ``jsd`` mixture weight in [0, 1].
        alpha: ``skew_*`` skew in [0, 1).
        top_k: Compare on the teacher's ``top_k`` tokens plus one bucket for the rest.
        top_p: Compare on the teacher's smallest token set holding ``top_p`` of its mass, plus the rest.

    Returns:
        ``(N,)`` divergences (float32 or wider).
    """
    s = student_logits.float() if student_logits.dtype not in (torch.float32, torch.float64) else student_logits
    t = teacher_logits.to(s.dtype)
    log_s, log_t = log_probs(s, temperature), log_probs(t, temperature)
    if top_k is not None or top_p is not None:
        log_s, log_t = restrict(log_s, log_t, top_k, top_p)
    return divergence(log_s, log_t, kind, beta, alpha) * temperature_scale(kind, temperature)


def divergence(log_s: Tensor, log_t: Tensor, kind: str, beta: float, alpha: float) -> Tensor:
    """Row-wise divergence of two finite log-probability tables over the same columns."""
    if kind == "forward_kl":
        return kl(log_t, log_s)
    if kind == "reverse_kl":
        return kl(log_s, log_t)
    if kind == "jsd":
        if beta == 0.0:
            return kl(log_t, log_s)
        if beta == 1.0:
            return kl(log_s, log_t)
        log_m = mix(log_t, log_s, beta)
        return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)
    if kind == "skew_kl":
        return kl(log_t, mix(log_t, log_s, alpha)) if alpha > 0 else kl(log_t, log_s)
    if kind == "skew_reverse_kl":
        return kl(log_s, mix(log_s, log_t, alpha)) if alpha > 0 else kl(log_s, log_t)
    if kind == "tvd":
        return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")


def divergence_and_grad(log_s: Tensor, log_t: Tensor, kind: str, beta: float, alpha: float,
                         temperature: float) -> tuple[Tensor, Tensor]:
    """:func:`token_divergence` (unrestricted: no ``top_k``/``top_p``) of each row and its
    gradient with respect to the student's logits, in closed form.

    With q = softmax(z / T) and g = dD/dq, the softmax's Jacobian gives
    dD/dz = (r - q * sum(r)) / T where r = q * g. Each divergence's r is written out below,
    sharing its exponentials with the value, so no autograd graph is built over the
    ``(rows, vocab)`` chunk. Returns ``(value, grad)``, both scaled as :func:`token_divergence` is.
    """
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind in ("skew_kl", "skew_reverse_kl") and alpha == 0.0:
        kind = "forward_kl" if kind == "skew_kl" else "reverse_kl"
    scale = temperature_scale(kind, temperature)
    q = log_s.exp()
    if kind == "forward_kl":  # g = -p / q, so r = -p and r - q sum(r) = q sum(p) - p
        p = log_t.exp()
        value = (p * (log_t - log_s)).sum(-1)
        grad = q.mul_(p.sum(-1, keepdim=True)).sub_(p)
    elif kind == "reverse_kl":  # g = log(q / p) + 1, so r - q sum(r) = q (log(q / p) - KL)
        d = log_s - log_t
        value = (q * d).sum(-1)
        grad = d.sub_(value[:, None]).mul_(q)
    elif kind == "jsd":  # m = beta p + (1 - beta) q; g = (1 - beta) log(q / m)
        log_m = mix(log_t, log_s, beta)
        value = beta * kl(log_t, log_m) + (1 - beta) * (q * (log_s - log_m)).sum(-1)
        r = (log_s - log_m).mul_(q).mul_(1 - beta)
        grad = r.sub_(q * r.sum(-1, keepdim=True))
    elif kind == "skew_kl":  # m = alpha p + (1 - alpha) q; g = -(1 - alpha) p / m
        log_m = mix(log_t, log_s, alpha)
        value = kl(log_t, log_m)
        r = (log_t + log_s - log_m).exp_().mul_(alpha - 1)
        grad = r.sub_(q * r.sum(-1, keepdim=True))
    elif kind == "skew_reverse_kl":  # m = alpha q + (1 - alpha) p; g = log(q / m) + 1 - alpha q / m
        log_q_m = log_s - mix(log_s, log_t, alpha)
        value = (q * log_q_m).sum(-1)
        r = (log_q_m + 1 - alpha * log_q_m.exp()).mul_(q)
        grad = r.sub_(q * r.sum(-1, keepdim=True))
    elif kind == "tvd":  # g = sign(q - p) / 2
        diff = q - log_t.exp()
        value = 0.5 * diff.abs().sum(-1)
        r = diff.sign_().mul_(q).mul_(0.5)
        grad = r.sub_(q * r.sum(-1, keepdim=True))
    else:
        raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    return value * scale, grad.mul_(scale / temperature)


def sparse_token_divergence(
    student_logits: Tensor,
    teacher_logp: Tensor,
    teacher_ids: Tensor | None,
    kind: str = "forward_kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """:func:`token_divergence` against a teacher given by its top-k log-probabilities.

    The teacher's distribution is its ``k`` kept tokens plus one bucket holding the rest of its
    mass (``1 - sum(exp(teacher_logp))``); the student's is pooled the same way, so this equals
    :func:`token_divergence` with ``top_k=k`` on the full teacher logits.

    Args:
        student_logits: ``(N, V)`` logits.
        teacher_logp: ``(N, k)`` the teacher's log-probabilities at ``temperature`` (``k = V``
            and ``teacher_ids=None`` for the full distribution).
        teacher_ids: ``(N, k)`` the vocabulary ids of those tokens, or ``None``.
        kind, temperature, beta, alpha: As in :func:`token_divergence`.
    """
    s = student_logits.float() if student_logits.dtype not in (torch.float32, torch.float64) else student_logits
    log_s = log_probs(s, temperature)
    log_t = teacher_logp.to(s.dtype).clamp_min(torch.finfo(s.dtype).min)
    if teacher_ids is not None:
        # The pooled buckets are floored at e^-100: when the k tokens hold (nearly) all the mass,
        # rounding leaves the teacher's bucket at ~1e-16 and the student's at exactly 0, and an
        # unfloored log would turn that rounding into a huge term.
        ids = teacher_ids.to(log_s.device)
        kept = log_s.gather(-1, ids)
        rest_s = log_s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(-100.0)
        rest_t = torch.log((1 - log_t.exp().sum(-1, keepdim=True)).clamp_min(0)).clamp_min(-100.0)
        log_s, log_t = torch.cat([kept, rest_s], -1), torch.cat([log_t, rest_t], -1)
    return divergence(log_s, log_t, kind, beta, alpha) * temperature_scale(kind, temperature)


def check_divergence(kind: str, beta: float, alpha: float, temperature: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
