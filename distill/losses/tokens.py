"""Token-level divergences for language models, and their chunked computation.

A language model's distillation loss compares, at every token, the student's next-token
distribution with the teacher's. Written naively it materialises both models' ``(tokens,
vocab)`` logits for the whole batch, and autograd keeps them for the backward pass: at a
128k vocabulary and 2,048 tokens that is 1 GiB per copy in float32. :func:`chunked_token_loss`
never holds more than one chunk of rows: it takes the final hidden states and the output
heads, computes each chunk's logits, loss and gradients at once, and keeps only the gradients
with respect to the (much narrower) hidden states and the head.

Divergences (``kind``), with P the teacher's and Q the student's distribution:

``forward_kl``       KL(P || Q), mean-seeking (Hinton KD per token).
``reverse_kl``       KL(Q || P), mode-seeking (MiniLLM, Gu et al. 2023).
``jsd``              generalized JSD with ``beta`` (GKD, Agarwal et al. 2024): 0 and 1 are forward and reverse KL.
``skew_kl``          KL(P || alpha P + (1 - alpha) Q) (DistiLLM, Ko et al. 2024).
``skew_reverse_kl``  KL(Q || alpha Q + (1 - alpha) P) (DistiLLM).
``tvd``              total variation, 0.5 * sum |P - Q|.

``top_k`` / ``top_p`` restrict the comparison to the teacher's most likely tokens: both
distributions keep their probabilities on those tokens and pool the rest into one "other"
bucket, so the mass outside the kept tokens is accounted for, not dropped or renormalised
away. The same form serves a cache of the teacher's top-k logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIVERGENCES",
    "TokenKDLoss",
    "chunked_cross_entropy",
    "chunked_token_loss",
    "chunked_topk_loss",
    "sparse_token_divergence",
    "token_divergence",
    "token_loss",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) of log-probabilities that are finite (see :func:`_log_probs`): where
    p underflows to 0 the term is 0, with no masking tensor to hold."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Tempered log-softmax, with ``-inf`` (a model's banned tokens) raised to the lowest finite
    value so that ``0 * log 0`` terms stay 0 rather than NaN."""
    log = F.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
    return log.clamp_min(torch.finfo(log.dtype).min)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stably."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _restrict(log_s: Tensor, log_t: Tensor, top_k: int | None, top_p: float | None) -> tuple[Tensor, Tensor]:
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
    log_s, log_t = _log_probs(s, temperature), _log_probs(t, temperature)
    if top_k is not None or top_p is not None:
        log_s, log_t = _restrict(log_s, log_t, top_k, top_p)
    # T^2 keeps the gradients' scale across temperatures (Hinton et al.); TVD is bounded, unscaled.
    return _divergence(log_s, log_t, kind, beta, alpha) * (1.0 if kind == "tvd" else temperature**2)


def _divergence(log_s: Tensor, log_t: Tensor, kind: str, beta: float, alpha: float) -> Tensor:
    """Row-wise divergence of two finite log-probability tables over the same columns."""
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(log_t, log_s)
        if beta == 1.0:
            return _kl(log_s, log_t)
        log_m = _mix(log_t, log_s, beta)
        return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    if kind == "skew_kl":
        return _kl(log_t, _mix(log_t, log_s, alpha)) if alpha > 0 else _kl(log_t, log_s)
    if kind == "skew_reverse_kl":
        return _kl(log_s, _mix(log_s, log_t, alpha)) if alpha > 0 else _kl(log_s, log_t)
    if kind == "tvd":
        return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")


def _divergence_and_grad(log_s: Tensor, log_t: Tensor, kind: str, beta: float, alpha: float,
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
    scale = 1.0 if kind == "tvd" else temperature**2
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
        log_m = _mix(log_t, log_s, beta)
        value = beta * _kl(log_t, log_m) + (1 - beta) * (q * (log_s - log_m)).sum(-1)
        r = (log_s - log_m).mul_(q).mul_(1 - beta)
        grad = r.sub_(q * r.sum(-1, keepdim=True))
    elif kind == "skew_kl":  # m = alpha p + (1 - alpha) q; g = -(1 - alpha) p / m
        log_m = _mix(log_t, log_s, alpha)
        value = _kl(log_t, log_m)
        r = (log_t + log_s - log_m).exp_().mul_(alpha - 1)
        grad = r.sub_(q * r.sum(-1, keepdim=True))
    elif kind == "skew_reverse_kl":  # m = alpha q + (1 - alpha) p; g = log(q / m) + 1 - alpha q / m
        log_q_m = log_s - _mix(log_s, log_t, alpha)
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
    log_s = _log_probs(s, temperature)
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
    # T^2 keeps the gradients' scale across temperatures (Hinton et al.); TVD is bounded, unscaled.
    return _divergence(log_s, log_t, kind, beta, alpha) * (1.0 if kind == "tvd" else temperature**2)


def _check(kind: str, beta: float, alpha: float, temperature: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _wide(x: Tensor) -> Tensor:
    """At least float32: half-precision states are upcast, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = _wide(hidden) @ _wide(weight).to(_wide(hidden).dtype).T
    return out + bias.to(out.dtype) if bias is not None else out


def token_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None = None,
    kind: str = "forward_kl",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """The naive loss: full logits of both models, mean divergence over the masked tokens.

    The reference that :func:`chunked_token_loss` must equal; it holds ``(N, V)`` logits.
    ``options`` are :func:`token_divergence`'s (``temperature``, ``beta``, ``alpha``, ``top_k``, ``top_p``).
    """
    _check(kind, options.get("beta", 0.5), options.get("alpha", 0.1), options.get("temperature", 1.0))
    s = _logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = _logits(teacher_hidden, teacher_weight, teacher_bias)
    per_token = token_divergence(s, t, kind, **options)
    if mask is None:
        return per_token.mean()
    mask = mask.reshape(-1).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


class _Chunked(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them.

    Per chunk only the logits' gradient is needed: in closed form when a ``row_grad`` gives it
    (every unrestricted divergence, cross-entropy), else by autograd over that chunk. The
    gradients of the hidden states, head and bias follow from it by two matrix products, the
    head's accumulated in place, so no head-sized temporary is made per chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        s_hidden: Tensor,
        s_weight: Tensor,
        s_bias: Tensor | None,
        mask: Tensor,
        chunk: int,
        row_loss: Callable[[Tensor, slice], Tensor],
        row_grad: RowGrad | None = None,
    ) -> Tensor:
        rows = s_hidden.shape[0]
        acc = _wide(s_hidden).dtype
        count = mask.sum().clamp_min(1).to(acc)
        weight = s_weight.detach().to(acc)
        bias = s_bias.detach().to(acc) if s_bias is not None else None
        grad_h = torch.zeros(s_hidden.shape, dtype=acc, device=s_hidden.device)
        grad_w = torch.zeros_like(weight) if s_weight.requires_grad else None
        grad_b = torch.zeros_like(bias) if bias is not None and s_bias.requires_grad else None  # type: ignore[union-attr]
        total = torch.zeros((), dtype=acc, device=s_hidden.device)
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            keep = mask[part].to(acc)
            if not keep.any():
                continue
            h = s_hidden[part].detach().to(acc)
            if row_grad is not None:
                per_token, grad_rows = row_grad(_logits(h, weight, bias), part)
                loss = (per_token * keep).sum() / count
                grad_logits = grad_rows * (keep / count)[:, None]
            else:
                logits = _logits(h, weight, bias).requires_grad_(True)
                with torch.enable_grad():
                    per_token = row_loss(logits, part)
                    loss = (per_token * keep).sum() / count
                    (grad_logits,) = torch.autograd.grad(loss, logits)
            total += loss.detach()
            grad_h[part] = grad_logits @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_logits.T, h)
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
        ctx.grads = (grad_h.to(s_hidden.dtype), None if grad_w is None else grad_w.to(s_weight.dtype),
                     None if grad_b is None else grad_b.to(s_bias.dtype))  # type: ignore[union-attr]
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor):  # type: ignore[override]
        # Scaled copies, not in place: a graph kept with retain_graph may be differentiated again.
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads]  # type: ignore[attr-defined]
        return grads[0], grads[1], grads[2], None, None, None, None


#: Logit elements per chunk when no chunk size is given: 8M float32 values, 32 MiB per copy
#: (the loss holds about a dozen copies of a chunk at its peak), whatever the vocabulary.
CHUNK_ELEMENTS = 2**23


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(16, CHUNK_ELEMENTS // vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


#: A chunk's per-row losses and their gradient with respect to its logits: ``(logits, rows) -> (loss, grad)``.
RowGrad = Callable[[Tensor, slice], tuple[Tensor, Tensor]]


def _apply_chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, chunk: int,
                   row_loss: Callable[[Tensor, slice], Tensor], row_grad: RowGrad | None = None) -> Tensor:
    """The chunked loss; without autograd (evaluation, inference mode) the same sum, no gradients."""
    wants_grad = any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if torch.is_grad_enabled() and wants_grad:
        return _Chunked.apply(hidden, weight, bias, mask, chunk, row_loss, row_grad)
    acc = _wide(hidden).dtype
    total = torch.zeros((), dtype=acc, device=hidden.device)
    count = mask.sum().clamp_min(1).to(acc)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, min(start + chunk, hidden.shape[0]))
        total += (row_loss(_logits(hidden[part], weight, bias), part) * mask[part].to(acc)).sum() / count
    return total


def chunked_token_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None = None,
    kind: str = "forward_kl",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    top_k: int | None = None,
    top_p: float | None = None,
    closed_form: bool = True,
) -> Tensor:
    """Mean token divergence over the masked tokens, never holding more than one chunk of logits.

    Equal to :func:`token_loss` (up to float rounding), gradients included. Gradients flow to
    ``student_hidden``, and to ``student_weight`` / ``student_bias`` when they require grad
    (a tied or frozen head works); the teacher's side is never differentiated.

    Args:
        student_hidden: ``(N, H_s)`` the student's final hidden states (after its last norm),
            one row per token; flatten ``(B, T, H)`` first.
        student_weight: ``(V, H_s)`` the student's output head.
        teacher_hidden: ``(N, H_t)`` the teacher's final hidden states for the same tokens.
        teacher_weight: ``(V, H_t)`` the teacher's output head (same vocabulary).
        mask: ``(N,)``, nonzero for the tokens that count (completion tokens, not padding).
        kind: One of :data:`DIVERGENCES`.
        chunk_size: Rows per chunk; peak memory grows with ``chunk_size * V``, not with ``N``.
            ``None`` picks :data:`CHUNK_ELEMENTS` ``// V`` rows (at least 16).
        temperature, beta, alpha, top_k, top_p: As in :func:`token_divergence`.
        closed_form: Without ``top_k``/``top_p``, take each chunk's gradient from its closed
            form rather than from autograd (the same values; less time and memory).

    Returns:
        A scalar.
    """
    _check(kind, beta, alpha, temperature)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_weight.shape[0]} and teacher vocabulary "
                         f"{teacher_weight.shape[0]} differ; token-level distillation needs one vocabulary")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows and {teacher_hidden.shape[0]} teacher rows")
    chunk_size = _chunk_rows(chunk_size, student_weight.shape[0])
    if mask is None:
        mask = torch.ones(student_hidden.shape[0], device=student_hidden.device)
    t_hidden, t_weight = teacher_hidden.detach(), teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()

    def row_loss(logits: Tensor, part: slice) -> Tensor:
        with torch.no_grad():
            teacher = _logits(t_hidden[part], t_weight, t_bias)
        return token_divergence(logits, teacher, kind, temperature=temperature, beta=beta, alpha=alpha,
                                top_k=top_k, top_p=top_p)

    def row_grad(logits: Tensor, part: slice) -> tuple[Tensor, Tensor]:
        teacher = _logits(t_hidden[part], t_weight, t_bias).to(logits.dtype)
        log_s, log_t = _log_probs(logits, temperature), _log_probs(teacher, temperature)
        return _divergence_and_grad(log_s, log_t, kind, beta, alpha, temperature)

    unrestricted = closed_form and top_k is None and top_p is None
    return _apply_chunked(student_hidden, student_weight, student_bias, mask.reshape(-1), chunk_size, row_loss,
                          row_grad if unrestricted else None)


def chunked_topk_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logp: Tensor,
    teacher_ids: Tensor | None = None,
    mask: Tensor | None = None,
    kind: str = "forward_kl",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """:func:`chunked_token_loss` against cached teacher log-probabilities (top-k or full).

    Args:
        student_hidden: ``(N, H)`` the student's final hidden states, one row per token.
        student_weight: ``(V, H)`` its output head.
        teacher_logp: ``(N, k)`` the teacher's log-probabilities at ``temperature``.
        teacher_ids: ``(N, k)`` their token ids; ``None`` when ``k = V`` (full distribution).
        mask, kind, chunk_size, student_bias, temperature, beta, alpha: As in :func:`chunked_token_loss`.
    """
    _check(kind, beta, alpha, temperature)
    if student_hidden.shape[0] != teacher_logp.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows and {teacher_logp.shape[0]} cached teacher rows")
    if teacher_ids is None and teacher_logp.shape[-1] != student_weight.shape[0]:
        raise ValueError(f"the cached full distribution has {teacher_logp.shape[-1]} tokens, the student's "
                         f"vocabulary {student_weight.shape[0]}")
    chunk_size = _chunk_rows(chunk_size, student_weight.shape[0])
    if mask is None:
        mask = torch.ones(student_hidden.shape[0], device=student_hidden.device)
    logp = teacher_logp.detach()

    def row_loss(logits: Tensor, part: slice) -> Tensor:
        ids = None if teacher_ids is None else teacher_ids[part]
        return sparse_token_divergence(logits, logp[part].to(logits.device), ids, kind, temperature=temperature,
                                       beta=beta, alpha=alpha)

    def row_grad(logits: Tensor, part: slice) -> tuple[Tensor, Tensor]:  # the full distribution, no pooling
        log_s = _log_probs(logits, temperature)
        log_t = logp[part].to(logits.device, logits.dtype).clamp_min(torch.finfo(logits.dtype).min)
        return _divergence_and_grad(log_s, log_t, kind, beta, alpha, temperature)

    return _apply_chunked(student_hidden, student_weight, student_bias, mask.reshape(-1), chunk_size, row_loss,
                          row_grad if teacher_ids is None else None)


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Mean next-token cross-entropy over the masked tokens, one chunk of logits at a time.

    The language-model task loss (and the sequence-level distillation loss on teacher
    generations), with the memory profile of :func:`chunked_token_loss`.

    Args:
        hidden: ``(N, H)`` final hidden states, one row per predicting position.
        weight: ``(V, H)`` output head.
        targets: ``(N,)`` the token each row must predict.
        mask: ``(N,)``, nonzero for the rows that count.
        chunk_size: Rows per chunk (``None``: as in :func:`chunked_token_loss`).
        bias: Optional ``(V,)`` head bias.
    """
    chunk_size = _chunk_rows(chunk_size, weight.shape[0])
    targets = targets.reshape(-1)
    if mask is None:
        mask = torch.ones(hidden.shape[0], device=hidden.device)

    def row_loss(logits: Tensor, part: slice) -> Tensor:
        return F.cross_entropy(logits, targets[part].to(logits.device), reduction="none")

    def row_grad(logits: Tensor, part: slice) -> tuple[Tensor, Tensor]:  # softmax minus the one-hot target
        rows = targets[part].to(logits.device)
        log_q = F.log_softmax(logits, -1)
        grad = log_q.exp()
        grad[torch.arange(len(rows), device=grad.device), rows] -= 1
        return -log_q.gather(-1, rows[:, None])[:, 0], grad

    return _apply_chunked(hidden, weight, bias, mask.reshape(-1), chunk_size, row_loss, row_grad)


class TokenKDLoss(nn.Module):
    """Token-level distillation of a causal LM: a divergence between next-token distributions.

    Reads the models' final hidden states and output heads (see
    :class:`~distill.models.causal_lm.HFCausalLMAdapter`) and computes the logits in chunks of
    tokens (:func:`chunked_token_loss`), so memory does not grow with the batch's token count
    beyond one chunk. Student and teacher must share one vocabulary; their widths may differ.

    Args:
        kind: One of :data:`DIVERGENCES` (``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``,
            ``skew_reverse_kl``, ``tvd``).
        temperature, beta, alpha, top_k, top_p: As in :func:`token_divergence`.
        chunk_size: Tokens per chunk; ``None`` sizes chunks to the vocabulary (see :data:`CHUNK_ELEMENTS`).

    Shapes: ``(B, T, H_s)`` and ``(B, T, H_t)`` hidden states, ``(B, T)`` mask, ``(V, H)`` heads;
    returns a scalar, the mean over unmasked tokens.
    """

    output = "hidden"
    projector = "never"
    uses_mask = True
    uses_head = True

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 top_k: int | None = None, top_p: float | None = None, chunk_size: int | None = None) -> None:
        super().__init__()
        _check(kind, beta, alpha, temperature)
        self.options = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha, "top_k": top_k,
                        "top_p": top_p, "chunk_size": chunk_size}

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, *,
                mask: Tensor | None = None, student_head: Tensor, teacher_head: Tensor | None = None,
                student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None,
                teacher_ids: Tensor | None = None) -> Tensor:
        if teacher_head is None:  # a logit cache: teacher_out holds the teacher's log-probabilities
            return self._from_cache(student_out, teacher_out, teacher_ids, mask, student_head, student_head_bias)
        if student_out.shape[:-1] != teacher_out.shape[:-1]:
            raise ValueError(f"student tokens {tuple(student_out.shape[:-1])} and teacher tokens "
                             f"{tuple(teacher_out.shape[:-1])} differ: do the models share one tokenizer?")
        s = student_out.reshape(-1, student_out.shape[-1])
        t = teacher_out.reshape(-1, teacher_out.shape[-1])
        return chunked_token_loss(s, student_head, t, teacher_head, None if mask is None else mask.reshape(-1),
                                  student_bias=student_head_bias, teacher_bias=teacher_head_bias, **self.options)

    def _from_cache(self, student_out: Tensor, teacher_logp: Tensor, teacher_ids: Tensor | None,
                    mask: Tensor | None, head: Tensor, bias: Tensor | None) -> Tensor:
        if self.options["top_p"] is not None:
            raise ValueError("token_kd: top_p cannot be applied to cached top-k logits; drop top_p or the cache")
        if student_out.shape[:-1] != teacher_logp.shape[:-1]:
            raise ValueError(f"student tokens {tuple(student_out.shape[:-1])} and cached teacher tokens "
                             f"{tuple(teacher_logp.shape[:-1])} differ: was the cache made with this tokenizer?")
        options = {k: self.options[k] for k in ("kind", "temperature", "beta", "alpha", "chunk_size")}
        k = teacher_logp.shape[-1]
        logp = teacher_logp.reshape(-1, k)
        ids = None if teacher_ids is None else teacher_ids.reshape(-1, k)
        return chunked_topk_loss(student_out.reshape(-1, student_out.shape[-1]), head, logp, ids,
                                 None if mask is None else mask.reshape(-1), student_bias=bias, **options)
