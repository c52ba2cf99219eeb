"""Token losses computed a chunk of rows at a time, gradients included.

A language model's distillation loss compares, at every token, the student's next-token
distribution with the teacher's. Written naively it materialises both models' ``(tokens,
vocab)`` logits for the whole batch, and autograd keeps them for the backward pass: at a
128k vocabulary and 2,048 tokens that is 1 GiB per copy in float32. :func:`chunked_token_loss`
never holds more than one chunk of rows: it takes the final hidden states and the output
heads, computes each chunk's logits, loss and gradients at once, and keeps only the gradients
with respect to the (much narrower) hidden states and the head. The divergences themselves
are :mod:`distill.losses.divergence`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.divergence import (
    check_divergence,
    divergence_and_grad,
    log_probs,
    sparse_token_divergence,
    token_divergence,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "chunked_cross_entropy",
    "chunked_token_loss",
    "chunked_topk_loss",
    "head_logits",
    "token_loss",
]


def wide(x: Tensor) -> Tensor:
    """At least float32: half-precision states are upcast, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = wide(hidden) @ wide(weight).to(wide(hidden).dtype).T
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
    check_divergence(kind, options.get("beta", 0.5), options.get("alpha", 0.1), options.get("temperature", 1.0))
    s = head_logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = head_logits(teacher_hidden, teacher_weight, teacher_bias)
    per_token = token_divergence(s, t, kind, **options)
    if mask is None:
        return per_token.mean()
    mask = mask.reshape(-1).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def _loss_and_grads(s_hidden: Tensor, s_weight: Tensor, s_bias: Tensor | None, mask: Tensor, chunk: int,
                    row_loss: Callable[[Tensor, slice], Tensor], row_grad: RowGrad | None
                    ) -> tuple[Tensor, tuple[Tensor, Tensor | None, Tensor | None]]:
    """The loss and its gradients with respect to hidden states, head and bias, chunk by chunk."""
    rows = s_hidden.shape[0]
    acc = wide(s_hidden).dtype
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
            per_token, grad_rows = row_grad(head_logits(h, weight, bias), part)
            loss = (per_token * keep).sum() / count
            grad_logits = grad_rows * (keep / count)[:, None]
        else:
            logits = head_logits(h, weight, bias).requires_grad_(True)
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
    return total, (grad_h.to(s_hidden.dtype), None if grad_w is None else grad_w.to(s_weight.dtype),
                   None if grad_b is None else grad_b.to(s_bias.dtype))  # type: ignore[union-attr]


class _Chunked(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them.

    Per chunk only the logits' gradient is needed: in closed form when a ``row_grad`` gives it
    (every unrestricted divergence, cross-entropy), else by autograd over that chunk. The
    gradients of the hidden states, head and bias follow from it by two matrix products, the
    head's accumulated in place, so no head-sized temporary is made per chunk. Backward scales
    them in place and hands them over (a head-sized copy would double the peak); a graph
    differentiated again (``retain_graph``, ``gradcheck``) recomputes them.
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
        total, ctx.grads = _loss_and_grads(s_hidden, s_weight, s_bias, mask, chunk, row_loss, row_grad)
        ctx.inputs = (s_hidden, s_weight, s_bias, mask, chunk, row_loss, row_grad)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor):  # type: ignore[override]
        grads = ctx.grads if ctx.grads is not None else _loss_and_grads(*ctx.inputs)[1]  # type: ignore[attr-defined]
        ctx.grads = None  # type: ignore[attr-defined]
        scaled = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None, None, None


#: Logit elements per chunk when no chunk size is given: 8M float32 values, 32 MiB per copy
#: (the loss holds about a dozen copies of a chunk at its peak), whatever the vocabulary.
CHUNK_ELEMENTS = 2**23


def chunk_rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(16, CHUNK_ELEMENTS // vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


#: A chunk's per-row losses and their gradient with respect to its logits: ``(logits, rows) -> (loss, grad)``.
RowGrad = Callable[[Tensor, slice], tuple[Tensor, Tensor]]


def apply_chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, chunk: int,
                   row_loss: Callable[[Tensor, slice], Tensor], row_grad: RowGrad | None = None) -> Tensor:
    """The chunked loss; without autograd (evaluation, inference mode) the same sum, no gradients."""
    wants_grad = any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if torch.is_grad_enabled() and wants_grad:
        return _Chunked.apply(hidden, weight, bias, mask, chunk, row_loss, row_grad)
    acc = wide(hidden).dtype
    total = torch.zeros((), dtype=acc, device=hidden.device)
    count = mask.sum().clamp_min(1).to(acc)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, min(start + chunk, hidden.shape[0]))
        total += (row_loss(head_logits(hidden[part], weight, bias), part) * mask[part].to(acc)).sum() / count
    return total


def _check_sides(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor
                 ) -> None:
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_weight.shape[0]} and teacher vocabulary "
                         f"{teacher_weight.shape[0]} differ; token-level distillation needs one vocabulary")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows and {teacher_hidden.shape[0]} teacher rows")


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
    temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
    top_k: int | None = None, top_p: float | None = None, closed_form: bool = True,
) -> Tensor:
    """Mean token divergence over the masked tokens, never holding more than one chunk of logits.

    Equal to :func:`token_loss` (up to float rounding), gradients included. Gradients flow to
    ``student_hidden``, and to ``student_weight`` / ``student_bias`` when they require grad
    (a tied or frozen head works); the teacher's side is never differentiated.

    Args:
        student_hidden: ``(N, H_s)`` the student's final hidden states (after its last norm), one row per token.
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

    Returns a scalar.
    """
    check_divergence(kind, beta, alpha, temperature)
    _check_sides(student_hidden, student_weight, teacher_hidden, teacher_weight)
    chunk_size = chunk_rows(chunk_size, student_weight.shape[0])
    if mask is None:
        mask = torch.ones(student_hidden.shape[0], device=student_hidden.device)
    t_hidden, t_weight = teacher_hidden.detach(), teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()

    def row_loss(logits: Tensor, part: slice) -> Tensor:
        with torch.no_grad():
            teacher = head_logits(t_hidden[part], t_weight, t_bias)
        return token_divergence(logits, teacher, kind, temperature=temperature, beta=beta, alpha=alpha,
                                top_k=top_k, top_p=top_p)

    def row_grad(logits: Tensor, part: slice) -> tuple[Tensor, Tensor]:
        teacher = head_logits(t_hidden[part], t_weight, t_bias).to(logits.dtype)
        log_s, log_t = log_probs(logits, temperature), log_probs(teacher, temperature)
        return divergence_and_grad(log_s, log_t, kind, beta, alpha, temperature)

    unrestricted = closed_form and top_k is None and top_p is None
    return apply_chunked(student_hidden, student_weight, student_bias, mask.reshape(-1), chunk_size, row_loss,
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
    check_divergence(kind, beta, alpha, temperature)
    if student_hidden.shape[0] != teacher_logp.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows and {teacher_logp.shape[0]} cached teacher rows")
    if teacher_ids is None and teacher_logp.shape[-1] != student_weight.shape[0]:
        raise ValueError(f"the cached full distribution has {teacher_logp.shape[-1]} tokens, the student's "
                         f"vocabulary {student_weight.shape[0]}")
    chunk_size = chunk_rows(chunk_size, student_weight.shape[0])
    if mask is None:
        mask = torch.ones(student_hidden.shape[0], device=student_hidden.device)
    logp = teacher_logp.detach()

    def row_loss(logits: Tensor, part: slice) -> Tensor:
        ids = None if teacher_ids is None else teacher_ids[part]
        return sparse_token_divergence(logits, logp[part].to(logits.device), ids, kind, temperature=temperature,
                                       beta=beta, alpha=alpha)

    def row_grad(logits: Tensor, part: slice) -> tuple[Tensor, Tensor]:  # the full distribution, no pooling
        log_s = log_probs(logits, temperature)
        log_t = logp[part].to(logits.device, logits.dtype).clamp_min(torch.finfo(logits.dtype).min)
        return divergence_and_grad(log_s, log_t, kind, beta, alpha, temperature)

    return apply_chunked(student_hidden, student_weight, student_bias, mask.reshape(-1), chunk_size, row_loss,
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
    chunk_size = chunk_rows(chunk_size, weight.shape[0])
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

    return apply_chunked(hidden, weight, bias, mask.reshape(-1), chunk_size, row_loss, row_grad)
