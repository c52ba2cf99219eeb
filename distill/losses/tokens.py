"""Token-level distillation of causal language models (the ``token_kd`` loss).

The divergences are :mod:`distill.losses.divergence`'s; :mod:`distill.losses.chunked` computes
them a chunk of tokens at a time from the models' final hidden states and output heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from distill.losses.chunked import chunked_token_loss, chunked_topk_loss
from distill.losses.divergence import check_divergence
from distill.losses.traits import LossTraits

__all__ = ["TeacherTopK", "TokenKDLoss"]


@dataclass
class TeacherTopK:
    """The teacher's next-token distribution as a logit cache holds it.

    ``logp``: ``(B, T, k)`` log-probabilities at the cache's temperature; ``ids``: ``(B, T, k)``
    their vocabulary ids, or ``None`` when ``k`` is the whole vocabulary.
    """

    logp: Tensor
    ids: Tensor | None = None


class TokenKDLoss(nn.Module):
    """Token-level distillation of a causal LM: a divergence between next-token distributions.

    Reads the models' final hidden states and output heads (see
    :class:`~distill.models.causal_lm.HFCausalLMAdapter`) and computes the logits in chunks of
    tokens (:func:`~distill.losses.chunked.chunked_token_loss`), so memory does not grow with the
    batch's token count beyond one chunk. Student and teacher must share one vocabulary; their
    widths may differ. :meth:`forward_cached` takes the teacher from a logit cache instead.

    Args:
        kind: One of :data:`~distill.losses.divergence.DIVERGENCES` (``forward_kl``,
            ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl``, ``tvd``).
        temperature, beta, alpha, top_k, top_p: As in :func:`~distill.losses.divergence.token_divergence`.
        chunk_size: Tokens per chunk; ``None`` sizes chunks to the vocabulary (see
            :data:`~distill.losses.chunked.CHUNK_ELEMENTS`).

    Shapes: ``(B, T, H_s)`` and ``(B, T, H_t)`` hidden states, ``(B, T)`` mask, ``(V, H)`` heads;
    returns a scalar, the mean over unmasked tokens.
    """

    traits: ClassVar[LossTraits] = LossTraits(output="hidden", projector="never", uses_mask=True, uses_head=True)

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 top_k: int | None = None, top_p: float | None = None, chunk_size: int | None = None) -> None:
        super().__init__()
        check_divergence(kind, beta, alpha, temperature)
        self.kind, self.temperature, self.beta, self.alpha = kind, temperature, beta, alpha
        self.top_k, self.top_p, self.chunk_size = top_k, top_p, chunk_size

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, *,
                mask: Tensor | None = None, student_head: Tensor, teacher_head: Tensor,
                student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None) -> Tensor:
        if student_out.shape[:-1] != teacher_out.shape[:-1]:
            raise ValueError(f"student tokens {tuple(student_out.shape[:-1])} and teacher tokens "
                             f"{tuple(teacher_out.shape[:-1])} differ: do the models share one tokenizer?")
        s = student_out.reshape(-1, student_out.shape[-1])
        t = teacher_out.reshape(-1, teacher_out.shape[-1])
        return chunked_token_loss(
            s, student_head, t, teacher_head, None if mask is None else mask.reshape(-1), self.kind, self.chunk_size,
            student_head_bias, teacher_head_bias, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
            top_k=self.top_k, top_p=self.top_p,
        )

    def forward_cached(self, student_out: Tensor, teacher: TeacherTopK, *, mask: Tensor | None = None,
                       student_head: Tensor, student_head_bias: Tensor | None = None) -> Tensor:
        """The same loss against a logit cache's top-k teacher log-probabilities (stored at
        this loss's temperature)."""
        if self.top_p is not None:
            raise ValueError("token_kd: top_p cannot be applied to cached top-k logits; drop top_p or the cache")
        if student_out.shape[:-1] != teacher.logp.shape[:-1]:
            raise ValueError(f"student tokens {tuple(student_out.shape[:-1])} and cached teacher tokens "
                             f"{tuple(teacher.logp.shape[:-1])} differ: was the cache made with this tokenizer?")
        k = teacher.logp.shape[-1]
        logp = teacher.logp.reshape(-1, k).to(student_out.device)
        ids = None if teacher.ids is None else teacher.ids.reshape(-1, k).to(student_out.device)
        return chunked_topk_loss(
            student_out.reshape(-1, student_out.shape[-1]), student_head, logp, ids,
            None if mask is None else mask.reshape(-1), self.kind, self.chunk_size, student_head_bias,
            temperature=self.temperature, beta=self.beta, alpha=self.alpha,
        )
