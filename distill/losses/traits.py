"""What a loss needs from the pairing and the training step, declared once per loss class.

Each loss class carries ``traits: ClassVar[LossTraits]``; the pairing (which outputs and
layers to compare, whether to add a projector) and the training step (which keyword
arguments to pass) read those fields and nothing else. A loss that needs something new adds
a field here, with its default, so no caller ever has to guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from torch import Tensor

__all__ = ["CachedLogitLoss", "DistillationLoss", "LossTraits"]


@dataclass(frozen=True)
class LossTraits:
    """A loss's needs. The defaults describe a plain ``forward(student_out, teacher_out)``."""

    output: str | None = None
    """The named model output it compares by default (``"logits"`` for logit losses); ``None``
    takes the task's output (``embedding`` or ``logits``) or the layers the recipe names."""
    projector: Literal["if_needed", "always", "never"] = "if_needed"
    """``if_needed``: a learned projector where widths differ; ``always``; or ``never``
    (relation losses compare ``N x N`` structures, so widths may differ)."""
    tap: Literal["output", "qkv"] = "output"
    """On named layers: a module's output, or a transformer block's stacked queries, keys and values."""
    uses_mask: bool = False
    """Receives ``mask=`` (``(N, T)``, 1 for real tokens) on text models."""
    uses_index: bool = False
    """Receives ``index=`` (the batch's example indices in the training set)."""
    uses_head: bool = False
    """Receives the models' output heads (``student_head=``, ``teacher_head=`` and their
    ``*_head_bias``) with their final hidden states: token-level losses of causal LMs. Such a
    loss can also read the teacher from a logit cache (``forward_cached``)."""
    cross_vocab: bool = False
    """Compares models whose tokenizers differ: also receives the character offset where each
    position's token ends on both sides (``student_ends=``, ``teacher_ends=``), the student's next
    tokens (``student_next=``) and the teacher's token mask (``teacher_mask=``); the pairing gives
    it the student's tokens for each teacher token."""
    in_batch: bool = False
    """Compares the examples of a batch with each other (similarities, distances, angles). With
    several processes it sees the whole global batch: every process's rows are gathered, with
    gradients, so the objective is the one a single process optimises."""
    trainable: bool = False
    """Has parameters or state (heads, memory banks) that train and are checkpointed with the
    student, and are never saved with it."""


class DistillationLoss(Protocol):
    """What the engine needs of a loss: its traits and a call on two tensors."""

    traits: ClassVar[LossTraits]

    def __call__(self, student_out: Tensor, teacher_out: Tensor, labels: Tensor | None = None,
                 **extra: object) -> Tensor: ...


class CachedLogitLoss(DistillationLoss, Protocol):
    """A loss with ``traits.uses_head`` that can also read the teacher from a logit cache."""

    def forward_cached(self, student_out: Tensor, teacher: Any, *, mask: Tensor | None = None,
                       student_head: Tensor, student_head_bias: Tensor | None = None) -> Tensor: ...
