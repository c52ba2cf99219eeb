"""Token-level distillation between causal LMs with different tokenizers (the ``cross_vocab_kd`` loss).

The two models split the same text into different tokens, so their positions do not line up
and their vocabularies have different ids. Each teacher token's text is split by the student's
tokenizer into pieces (the student's tokens for it), and the teacher's next-token distribution
is carried onto the student's vocabulary piece by piece:

- where both tokenizations end a token at the same character, both models have read the same
  text: each teacher token's probability goes to its first piece (where the teacher expects
  " thee", a student without that token expects " the");
- where the student stands inside the teacher's next token, having read its first ``k``
  pieces, the teacher's tokens whose pieces begin with those ``k`` keep their probability,
  renormalised, and it goes to their piece ``k + 1``.

The loss is the forward KL from that carried distribution to the student's, at every student
position it reaches. An optional second term is ULD (Boizard et al., 2024, "Towards
Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"): the L1 distance
between the two distributions' probabilities sorted in decreasing order (the shorter vocabulary
padded with zeros), at the positions where both models have read the same text.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill.losses.chunked import chunk_rows, head_logits
from distill.losses.traits import LossTraits

__all__ = ["CrossVocabKDLoss", "PieceTable", "pair_positions", "sorted_l1"]

#: A student position's place inside the teacher's next token: the student tokens read since
#: the teacher's last token ended (empty where both tokenizations end a token together).
Prefix = tuple[int, ...]


class PieceTable:
    """Each teacher token split into student tokens, looked up by the pieces already read.

    Args:
        pieces: For each teacher token id, the student's tokens for its text (empty where it
            has none of its own: special tokens, byte pieces of a character).
    """

    def __init__(self, pieces: Sequence[Sequence[int]]) -> None:
        self.size = len(pieces)
        self.first = torch.tensor([p[0] if p else -1 for p in pieces], dtype=torch.long)
        grouped: dict[Prefix, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for t_id, seq in enumerate(pieces):
            for k in range(1, len(seq)):
                teacher_ids, next_ids = grouped[tuple(seq[:k])]
                teacher_ids.append(t_id)
                next_ids.append(seq[k])
        self.after: dict[Prefix, tuple[Tensor, Tensor]] = {
            prefix: (torch.tensor(t, dtype=torch.long), torch.tensor(n, dtype=torch.long))
            for prefix, (t, n) in grouped.items()}

    def knows(self, prefix: Prefix) -> bool:
        return not prefix or prefix in self.after

    def carry(self, p: Tensor, prefixes: Sequence[Prefix], vocab: int) -> Tensor:
        """``(N, V_t)`` teacher probabilities carried onto ``vocab`` student tokens, row ``i`` after
        the pieces ``prefixes[i]``, renormalised: ``(N, vocab)``."""
        first = self.first.to(p.device)[: p.shape[-1]]
        keep = first >= 0
        out = p.new_zeros(p.shape[0], vocab).index_add_(1, first[keep], p[:, : len(keep)][:, keep])
        inside = [i for i, prefix in enumerate(prefixes) if prefix]
        if inside:
            rows, cols, values = [], [], []
            for k, i in enumerate(inside):
                teacher_ids, next_ids = self.after[prefixes[i]]
                rows.append(torch.full_like(next_ids, k))
                cols.append(next_ids)
                values.append(p[i, teacher_ids.to(p.device)])
            part = p.new_zeros(len(inside), vocab).index_put_(
                (torch.cat(rows).to(p.device), torch.cat(cols).to(p.device)), torch.cat(values), accumulate=True)
            out[inside] = part
        return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def pair_positions(student_ends: Tensor, student_mask: Tensor, student_next: Tensor, teacher_ends: Tensor,
                   teacher_mask: Tensor, table: PieceTable | None = None) -> tuple[Tensor, Tensor, list[Prefix]]:
    """Each student position with the teacher position whose next token it stands in.

    Args:
        student_ends, teacher_ends: ``(B, T_s)``, ``(B, T_t)`` the character offset at which each
            position's token ends in its text (``-1`` for padding).
        student_mask, teacher_mask: the same shapes, 1 where the position predicts a real token.
        student_next: ``(B, T_s)`` the student's next token at each position.
        table: Positions inside a teacher token are kept only where it knows the pieces read;
            ``None`` keeps only the positions where both tokenizations end a token together.

    Returns:
        ``(student_index, teacher_index, prefixes)``: indices into the flattened ``(B * T_s)``
        and ``(B * T_t)`` positions and, for each pair, the student tokens read since the
        teacher position's token ended. Where several positions of one side end at the same
        character (a character split into byte tokens) the last one counts.
    """
    if student_ends.shape[0] != teacher_ends.shape[0]:
        raise ValueError(f"{student_ends.shape[0]} student rows and {teacher_ends.shape[0]} teacher rows")
    s_index: list[int] = []
    t_index: list[int] = []
    prefixes: list[Prefix] = []
    s_width, t_width = student_ends.shape[1], teacher_ends.shape[1]
    for row in range(student_ends.shape[0]):
        s_ends, t_ends = student_ends[row].tolist(), teacher_ends[row].tolist()
        s_keep, nexts = student_mask[row].tolist(), student_next[row].tolist()
        t_at = {end: j for j, (end, keep) in enumerate(zip(t_ends, teacher_mask[row].tolist(), strict=True))
                if keep and end >= 0}
        anchor: tuple[int, int] | None = None  # (teacher position, student position) ending together
        for p, end in enumerate(s_ends):
            if end < 0:
                break
            last_of_end = p + 1 == len(s_ends) or s_ends[p + 1] != end
            if end in t_at and last_of_end:
                anchor, prefix = (t_at[end], p), ()
            elif anchor is not None and end < t_ends[anchor[0] + 1]:
                prefix = tuple(nexts[anchor[1] : p])
            else:
                anchor = None
                continue
            known = not prefix if table is None else table.knows(prefix)
            if s_keep[p] and last_of_end and known:
                s_index.append(row * s_width + p)
                t_index.append(row * t_width + anchor[0])
                prefixes.append(prefix)
    device = student_ends.device
    return (torch.tensor(s_index, dtype=torch.long, device=device),
            torch.tensor(t_index, dtype=torch.long, device=device), prefixes)


class CrossVocabKDLoss(nn.Module):
    """Distillation between causal LMs whose tokenizers differ: forward KL through the student's
    pieces of each teacher token, optionally with ULD.

    Reads both models' final hidden states and output heads (see
    :class:`~distill.models.causal_lm.HFCausalLMAdapter`), each on its own tokenization of
    the same text, the character offset where each token ends (``token_ends``) and the
    student's next tokens, which pair the positions (:func:`pair_positions`). The pairing gives
    the teacher tokens' pieces (:meth:`set_pieces`); without them only the ULD term can count.
    Logits are computed a chunk of positions at a time, the student's recomputed in the backward
    pass, so memory does not grow with the token count.

    Args:
        temperature: Both distributions are softened by it.
        mapped_weight: Weight of the forward KL from the teacher's distribution carried onto
            the student's vocabulary.
        uld_weight: Weight of the sorted-probability L1 term (off by default: on Tiny
            Shakespeare it made the student worse, see docs/results.md).
        chunk_size: Paired positions per chunk; ``None`` sizes chunks to the larger vocabulary.

    Shapes: ``(B, T_s, H_s)`` and ``(B, T_t, H_t)`` hidden states, ``(V_s, H_s)`` and
    ``(V_t, H_t)`` heads, ``(B, T)`` masks, ends and next tokens per side; returns a scalar, the
    mean over paired positions (0 when there are none).
    """

    traits: ClassVar[LossTraits] = LossTraits(output="hidden", projector="never", uses_mask=True, uses_head=True,
                                              cross_vocab=True)

    def __init__(self, temperature: float = 1.0, mapped_weight: float = 1.0, uld_weight: float = 0.0,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if uld_weight < 0 or mapped_weight < 0 or uld_weight + mapped_weight == 0:
            raise ValueError(f"uld_weight ({uld_weight}) and mapped_weight ({mapped_weight}) must be >= 0, "
                             "not both 0")
        self.temperature, self.uld_weight, self.mapped_weight = temperature, uld_weight, mapped_weight
        self.chunk_size = chunk_size
        self.table: PieceTable | None = None

    def set_pieces(self, pieces: Sequence[Sequence[int]]) -> None:
        """For each teacher token id, the student's tokens for its text (empty: none)."""
        self.table = PieceTable(pieces)

    def forward(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None, *,
                mask: Tensor, student_head: Tensor, teacher_head: Tensor, student_ends: Tensor,
                student_next: Tensor, teacher_ends: Tensor, teacher_mask: Tensor,
                student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None) -> Tensor:
        mapped = self.mapped_weight if self.table is not None else 0.0
        s_index, t_index, prefixes = pair_positions(student_ends, mask, student_next, teacher_ends, teacher_mask,
                                                    self.table if mapped else None)
        if len(s_index) == 0:
            return student_out.sum() * 0.0
        s = student_out.reshape(-1, student_out.shape[-1])[s_index]
        t = teacher_out.reshape(-1, teacher_out.shape[-1])[t_index].detach()
        rows = chunk_rows(self.chunk_size, max(student_head.shape[0], teacher_head.shape[0]))
        total = s.new_zeros((), dtype=torch.float32)
        for start in range(0, len(s), rows):
            part = slice(start, start + rows)
            with torch.no_grad():
                p = (head_logits(t[part], teacher_head, teacher_head_bias) / self.temperature).softmax(-1)
                target = self.table.carry(p, prefixes[part], student_head.shape[0]) if mapped else None
                together = torch.tensor([not prefix for prefix in prefixes[part]], device=p.device)
            args = (s[part], p, target, together, student_head, student_head_bias)
            total = total + (checkpoint(self._chunk_sum, *args, use_reentrant=False)
                             if torch.is_grad_enabled() else self._chunk_sum(*args))
        return total / len(s)

    def _chunk_sum(self, s: Tensor, p: Tensor, target: Tensor | None, together: Tensor, weight: Tensor,
                   bias: Tensor | None) -> Tensor:
        s_logits = head_logits(s, weight, bias) / self.temperature
        total = s_logits.new_zeros(())
        if target is not None:
            s_logp = F.log_softmax(s_logits, -1)
            total = total + self.mapped_weight * (target * (target.clamp_min(1e-30).log() - s_logp)).sum()
        if self.uld_weight and bool(together.any()):
            total = total + self.uld_weight * sorted_l1(s_logits[together].softmax(-1), p[together]).sum()
        return total


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per row, the L1 distance between ``p`` and ``q`` sorted in decreasing order, the shorter
    padded with zeros: ``(N, V_p)``, ``(N, V_q)`` -> ``(N,)``."""
    p_sorted = p.sort(-1, descending=True).values
    q_sorted = q.sort(-1, descending=True).values
    k = min(p.shape[-1], q.shape[-1])
    return ((p_sorted[:, :k] - q_sorted[:, :k]).abs().sum(-1)
            + p_sorted[:, k:].sum(-1) + q_sorted[:, k:].sum(-1))
