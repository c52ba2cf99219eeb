"""One distillation step: the loss terms, what each loss is given, and the weighted sum.

The step returns a dict of every loss part (``loss`` is their sum); the loop logs every key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from distill.collectives import gather_rows, world_size
from distill.errors import RecipeError
from distill.losses.tokens import TeacherTopK
from distill.losses.traits import CachedLogitLoss, DistillationLoss
from distill.models.adapters import Adapter
from distill.tasks import Batch

__all__ = [
    "TOKENS",
    "LossTerm",
    "StepModule",
    "Teacher",
    "TeacherOutputs",
    "TeacherStore",
    "distill_step",
    "loss_extras",
    "projector_key",
    "teacher_map_key",
    "teacher_outputs",
]

#: The teacher as the loop calls it: model inputs to named outputs.
Teacher = Callable[[dict[str, Any]], dict[str, Tensor]]
#: What a step compares the student with: the teacher's named outputs, or a logit cache's rows.
TeacherOutputs = dict[str, Tensor] | TeacherTopK


@dataclass
class LossTerm:
    """One weighted loss between student outputs and teacher outputs.

    ``pairs`` lists the (student output, teacher output) names it compares; with several
    pairs (one per mapped layer) the term is their mean. ``start_step`` and ``ramp_steps``
    schedule the weight.
    """

    name: str
    weight: float
    on: str
    loss: DistillationLoss
    pairs: list[tuple[str, str]] = field(default_factory=list)
    start_step: int = 0
    ramp_steps: int = 0
    layers: Any = None
    projector: str | None = None
    """``always`` / ``never`` from the recipe; ``None`` leaves it to the loss's own ``projector``."""

    def __post_init__(self) -> None:
        if not self.pairs and self.layers is None:
            self.pairs = [(self.on, self.on)]

    def factor(self, step: int) -> float:
        """Share of ``weight`` that applies at optimizer step ``step`` (0-based)."""
        if step < self.start_step:
            return 0.0
        if self.ramp_steps:
            return min(1.0, (step - self.start_step + 1) / self.ramp_steps)
        return 1.0

    @property
    def label(self) -> str:
        """Name of this term's part in the logs."""
        return f"{self.name}_loss"


#: Key of a step's token count among its parts (a causal LM's tokens that enter the loss); not a loss.
TOKENS = "tokens"


def projector_key(term_index: int, pair_index: int) -> str:
    """Key of the projector of one (term, layer pair) in the projector ``ModuleDict``."""
    return f"{term_index}_{pair_index}"


def teacher_map_key(term_index: int, pair_index: int) -> str:
    """Key of the fixed map of the teacher's side of one (term, layer pair) (``projector: pca``)."""
    return f"teacher_{term_index}_{pair_index}"


def _heads(student_out: dict[str, Tensor], teacher_out: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The output heads (and biases) of both models, for token-level losses; only the student's
    when the teacher is a logit cache (``teacher_out`` is ``None``)."""
    if "head" not in student_out or (teacher_out is not None and "head" not in teacher_out):
        raise ValueError("this loss needs both models' output heads: use it with causal language models "
                         "(kind: hf-causal-lm)")
    extra = {"student_head": student_out["head"]}
    if "head_bias" in student_out:
        extra["student_head_bias"] = student_out["head_bias"]
    if teacher_out is not None:
        extra["teacher_head"] = teacher_out["head"].to(student_out["head"].device)
        if "head_bias" in teacher_out:
            extra["teacher_head_bias"] = teacher_out["head_bias"]
    return extra


def loss_extras(loss: DistillationLoss, student_out: dict[str, Tensor], index: Tensor | None,
                teacher_out: dict[str, Tensor] | None) -> dict[str, Any]:
    """Keyword arguments a loss's traits ask for: the token mask, the batch's example indices,
    the output heads (``teacher_out=None``: the teacher is a logit cache, no teacher head)."""
    traits = loss.traits
    extra: dict[str, Any] = _heads(student_out, teacher_out) if traits.uses_head else {}
    if traits.uses_mask and "token_mask" in student_out:
        extra["mask"] = student_out["token_mask"]
    if traits.uses_index:
        extra["index"] = index
    if traits.cross_vocab:
        extra.update(_token_ends(student_out, teacher_out))
    return extra


def _token_ends(student_out: dict[str, Tensor], teacher_out: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Where each position's token ends in the text, on both sides, the student's next tokens and
    the teacher's token mask."""
    if teacher_out is None:
        raise RecipeError("a cross-tokenizer loss (cross_vocab_kd) needs the teacher online: set cache.top_k: null")
    if "token_ends" not in student_out or "token_ends" not in teacher_out:
        raise RecipeError("a cross-tokenizer loss (cross_vocab_kd) pairs positions by where tokens end in the text: "
                          "it needs plain text batches (data.format text, or records with a 'text' field) and "
                          "fast tokenizers on both models; prompt/completion, chat and on-policy batches are "
                          "not supported")
    return {"student_ends": student_out["token_ends"], "student_next": student_out["targets"],
            "teacher_ends": teacher_out["token_ends"], "teacher_mask": teacher_out["token_mask"]}


class TeacherSideMap(Protocol):
    """A fixed map of the teacher's outputs (``projector: pca``, :class:`distill.pairing.TeacherMap`)."""

    def __call__(self, teacher_out: Tensor) -> Tensor: ...

    def compare(self, mapped: Tensor) -> Tensor:
        """Vectors in the mapped space as the loss compares them (the student's side too)."""
        ...


def _term_value(term: LossTerm, s: Tensor, t_key: str, out: dict[str, Tensor], teacher_out: TeacherOutputs,
                t_map: TeacherSideMap | None, labels: Tensor | None, index: Tensor | None, share: float) -> Tensor:
    if isinstance(teacher_out, TeacherTopK):
        if not term.loss.traits.uses_head:  # only token losses can read a logit cache
            raise RecipeError(f"loss '{term.name}' cannot read the teacher from a logit cache (cache.top_k); "
                              "only token_kd can: drop the cache or this loss")
        loss = cast(CachedLogitLoss, term.loss)
        return loss.forward_cached(s, teacher_out, **loss_extras(term.loss, out, index, None))
    t = teacher_out[t_key].to(s.device, s.dtype)
    if t_map is not None:
        t = t_map(t)
        s = t_map.compare(s)
    if term.loss.traits.in_batch and world_size() > 1:
        # The whole global batch, as one process sees it; labels and indices are not used by such losses.
        # A process left with no example (share 0) holds a stand-in row, which is not gathered.
        rows = slice(None) if share > 0 else slice(0)
        value = term.loss(gather_rows(s[rows]), gather_rows(t[rows]), None,
                          **loss_extras(term.loss, out, None, teacher_out))
        return value / share if share > 0 else value  # the global batch's already: not re-weighted by share
    return term.loss(s, t, labels, **loss_extras(term.loss, out, index, teacher_out))


def distill_step(
    student: Adapter,
    batch: Batch,
    teacher_out: TeacherOutputs | None,
    terms: list[LossTerm],
    projectors: nn.Module,
    task_loss: Callable[[dict[str, Tensor], Batch], Tensor] | None,
    task_weight: float,
    labels_for_losses: bool,
    step: int = 0,
) -> dict[str, Tensor]:
    """Compute every loss part of one batch at optimizer step ``step``; ``loss`` is their weighted sum."""
    out = student(batch["inputs"])
    parts: dict[str, Tensor] = {}
    labels = batch.get("labels") if labels_for_losses else None
    index, share = batch.get("index"), float(batch.get("share", 1.0))
    for i, term in enumerate(terms):
        assert teacher_out is not None
        values = []
        for j, (s_key, t_key) in enumerate(term.pairs):
            s = out[s_key]
            key, t_map = projector_key(i, j), teacher_map_key(i, j)
            if key in projectors:
                s = projectors[key](s)
            values.append(_term_value(term, s, t_key, out, teacher_out,
                                      cast(TeacherSideMap, projectors[t_map]) if t_map in projectors else None,
                                      None if labels is None else labels.to(s.device), index, share))
        value = torch.stack(values).mean() if len(values) > 1 else values[0]
        label = term.label if term.label not in parts else f"{term.name}{i}_loss"
        parts[label] = term.weight * term.factor(step) * value
    if task_loss is not None and task_weight > 0:
        parts["task_loss"] = task_weight * task_loss(out, batch)
    parts["loss"] = sum(parts.values())  # type: ignore[assignment]
    if "token_mask" in out:
        # Token-level parts are means over this batch's tokens; the loop weighs them by this count
        # so that an optimizer step averages over all of its tokens (see distill.engine).
        parts[TOKENS] = out["token_mask"].sum().detach()
    return parts


class StepModule(nn.Module):
    """A distillation step as one module: the student and everything trained with it
    (projectors, learned loss heads), whose ``forward`` returns the step's loss parts.

    With several processes this module is what DistributedDataParallel wraps: one forward per
    step through the wrapper, so the gradients of every trained parameter, not only the
    student's, are averaged across processes. The teacher is not part of it.
    """

    def __init__(self, student: Adapter, projectors: nn.ModuleDict, terms: list[LossTerm],
                 task_loss: Callable[[dict[str, Tensor], Batch], Tensor] | None, task_weight: float,
                 labels_for_losses: bool) -> None:
        super().__init__()
        self.student = student.module
        self.projectors = projectors
        self._adapter, self._terms = student, terms
        self._task_loss, self._task_weight, self._labels = task_loss, task_weight, labels_for_losses

    def forward(self, batch: Batch, teacher_out: TeacherOutputs | None, step: int) -> dict[str, Tensor]:
        # The task loss on text the student wrote itself would teach it its own samples: an
        # on-policy batch is scored by the teacher alone (as in GKD).
        task_weight = 0.0 if batch.get("on_policy") else self._task_weight
        return distill_step(self._adapter, batch, teacher_out, self._terms, self.projectors, self._task_loss,
                            task_weight, self._labels, step)


class TeacherStore(Protocol):
    """Stored teacher outputs by example index (:class:`~distill.cache.TeacherCache`,
    :class:`~distill.logit_cache.TokenLogitCache`)."""

    def lookup(self, index: Tensor) -> TeacherOutputs: ...


def teacher_outputs(batch: Batch, teacher: Teacher | None, cache: TeacherStore | None, needed: bool
                    ) -> TeacherOutputs | None:
    """The teacher's side of a batch: from the store when there is one, else from the teacher
    online (``None`` when no loss term needs it)."""
    if not needed:
        return None
    if cache is not None:
        return cache.lookup(batch["index"])
    assert teacher is not None
    # no_grad, not inference_mode: the outputs are targets in an autograd graph.
    with torch.no_grad():
        out = dict(teacher(batch["inputs"]))
    # A sharded teacher's weights (its output head) come back as shards: gathered, in the same
    # order on every process.
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in out.items()}
