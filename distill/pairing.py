"""From a recipe's loss list to runnable loss terms: outputs and layers paired, projectors built.

The recipe, the :class:`~distill.Distiller` and the bench scripts all go through
:func:`prepare_pair`: it instantiates the losses, taps the layers that feature losses name
(forward hooks, see :mod:`distill.features`), adds a learned projector wherever a loss needs
equal widths and the models differ, and runs every term once on a sample batch so that a
mismatch is reported before training, with the loss and layer it concerns.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import LossSpec
from distill.errors import ModelError, RecipeError
from distill.features import TappedAdapter, block_paths, map_layers, qkv_paths, resolve_layer
from distill.losses import LOSSES, CrossVocabKDLoss
from distill.models.causal_lm import HFCausalLMAdapter, token_pieces
from distill.models.layout import channels_last_for_inference
from distill.registry import suggest
from distill.step import LossTerm, loss_extras, projector_key, teacher_map_key

__all__ = ["FIT_EXAMPLES", "Pairing", "TeacherMap", "build_loss_terms", "fit_teacher_maps", "make_projector",
           "pair_outputs", "prepare_pair", "tap_models", "teacher_map_outputs", "teacher_rows"]

#: Training examples the teacher runs on to fit a ``projector: pca`` map when there is no cache.
FIT_EXAMPLES = 8192


log = logging.getLogger(__name__)


def _config_of(adapter: Any) -> Any:
    module = adapter.module
    module = getattr(module, "module", module)
    return getattr(module, "config", None)


def _attention_params(name: str, cls: type, params: dict[str, Any], student: Any, teacher: Any) -> dict[str, Any]:
    """Fill ``heads`` (and ``student_heads``) of attention losses from the models' configs."""
    accepted = inspect.signature(cls).parameters
    if "heads" not in accepted or "heads" in params:
        return params
    if student is None or teacher is None:
        return {**params, "heads": 1}  # validation only: the models are not loaded
    s_cfg, t_cfg = _config_of(student), _config_of(teacher)
    if s_cfg is None or t_cfg is None or not hasattr(t_cfg, "num_attention_heads"):
        raise RecipeError(f"loss '{name}': give params.heads (the models carry no attention-head count)")
    t_heads, s_heads = t_cfg.num_attention_heads, s_cfg.num_attention_heads
    if "student_heads" in accepted:
        return {**params, "heads": t_heads, "student_heads": s_heads}
    widths = (t_cfg.hidden_size, s_cfg.hidden_size)
    for heads in (t_heads, s_heads, math.gcd(*widths)):
        if all(w % heads == 0 for w in widths):
            return {**params, "heads": heads}
    raise RecipeError(f"loss '{name}': give params.heads")  # unreachable: gcd divides both


#: Loss parameters the runner fills in from the data and the models' outputs.
_SIZED = ("student_dim", "teacher_dim", "num_examples")


def build_loss_terms(specs: list[LossSpec], default_on: str, student: Any = None, teacher: Any = None,
                     sizes: dict[str, int] | None = None) -> list[LossTerm]:
    """Instantiate the recipe's loss terms, with errors that name the bad parameter.

    Without models (``distill validate``) the terms are built to check their parameters;
    layer pairs are filled in later by :func:`tap_models`, and losses sized by the data
    (``crd``) get their sizes from ``sizes`` (placeholders until then).
    """
    terms = []
    for i, spec in enumerate(specs):
        cls = LOSSES.get(spec.name)
        if cls.traits.tap == "qkv" and spec.layers is None:
            raise RecipeError(f"losses.{i}: loss '{spec.name}' compares attention inside transformer blocks; "
                              "name them with layers (for example layers: {student: [-1], teacher: [-1]})")
        params = _attention_params(spec.name, cls, dict(spec.params), student, teacher)
        accepted = inspect.signature(cls).parameters
        params.update({k: (sizes or {}).get(k, 2) for k in _SIZED if k in accepted and k not in params})
        try:
            loss = cls(**params)
        except TypeError:
            allowed = [p for p in inspect.signature(cls).parameters]
            bad = [k for k in spec.params if k not in allowed]
            missing = [p for p, v in inspect.signature(cls).parameters.items()
                       if v.default is inspect.Parameter.empty and p not in params]
            if not bad and missing:
                raise RecipeError(f"losses.{i}.params: loss '{spec.name}' needs {missing}") from None
            if not bad:  # every name is known: a value of the wrong type
                raise RecipeError(f"losses.{i}.params: loss '{spec.name}' cannot take {spec.params}: "
                                  "a value has the wrong type (numbers are written as 2.0, lists as [0, 5])") from None
            hint = suggest(bad[0], allowed) if bad else ""
            raise RecipeError(
                f"losses.{i}.params: loss '{spec.name}' has no parameter {bad};{hint} "
                f"allowed: {', '.join(allowed) or 'none'}"
            ) from None
        except ValueError as exc:
            raise RecipeError(f"losses.{i}.params: {exc}") from None
        on = spec.on or cls.traits.output or default_on
        terms.append(LossTerm(spec.name, spec.weight, on, loss, start_step=spec.start_step,
                              ramp_steps=spec.ramp_steps, layers=spec.layers, projector=spec.projector))
    return terms


def _tap(module: nn.Module, layer: str | int, kind: str, taps: dict[str, Any]) -> str:
    path = resolve_layer(module, layer)
    if kind == "qkv":
        key = f"qkv:{path}"
        taps[key] = qkv_paths(module, path)
    else:
        key = f"layer:{path}"
        taps[key] = path
    return key


def tap_models(terms: list[LossTerm], student: Any, teacher: Any) -> tuple[Any, Any]:
    """Fill the layer pairs of feature terms and hook those layers.

    Returns the student and teacher, wrapped in :class:`TappedAdapter` when any layer is
    tapped (unchanged otherwise). The caller removes the teacher's hooks when done with it.
    """
    s_taps: dict[str, Any] = {}
    t_taps: dict[str, Any] = {}
    for i, term in enumerate(terms):
        spec = term.layers
        if spec is None:
            continue
        kind = term.loss.traits.tap
        teacher_layers = spec.teacher if spec.teacher is not None else (spec.student if spec.map == "pairs" else None)
        try:
            pairs = map_layers(spec.student, teacher_layers, spec.map, len(block_paths(teacher.module)))
            term.pairs = [(_tap(student.module, s, kind, s_taps), _tap(teacher.module, t, kind, t_taps))
                          for s, t in pairs]
        except ModelError as exc:
            raise ModelError(f"losses.{i} ({term.name}) layers: {exc}") from None
    if not s_taps:
        return student, teacher
    return TappedAdapter(student, s_taps), TappedAdapter(teacher, t_taps)


def make_projector(student: Tensor, teacher: Tensor) -> nn.Module:
    """A learned map from the student's width to the teacher's: 1x1 convolution for ``(N, C, H, W)``
    feature maps, linear on the last axis otherwise."""
    if student.dim() == 4:
        return nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False)
    return nn.Linear(student.shape[-1], teacher.shape[-1])


class TeacherMap(nn.Module):
    """A fixed linear map of the teacher's ``(N, D_t)`` outputs down to the student's width ``D_s``.

    Its columns are the top ``D_s`` principal components of the teacher's outputs on the
    training data (eigenvectors of their covariance); the outputs are projected without
    centring, so the cosine geometry of normalised embeddings is kept as far as ``D_s``
    dimensions can. Fitted once (:meth:`fit`), never trained, checkpointed with the projectors.

    With ``whiten``, the loss compares both sides in the teacher's whitened coordinates: centred
    on the teacher's mean and each axis divided by the teacher's spread along it
    (:meth:`compare`), so that an error along a direction of small spread counts as much as one
    along a dominant direction.
    """

    def __init__(self, teacher_dim: int, student_dim: int, whiten: bool = False) -> None:
        super().__init__()
        self.whiten = whiten
        self.register_buffer("components", torch.eye(teacher_dim, student_dim))
        self.register_buffer("kept", torch.zeros(()))
        if whiten:  # only then: checkpoints of plain maps keep their keys
            self.register_buffer("mean", torch.zeros(student_dim))
            self.register_buffer("scale", torch.ones(student_dim))

    def fit(self, rows: Tensor) -> float:
        """Fit on ``(N, D_t)`` teacher outputs; returns the share of their (centred) variance kept."""
        x = rows.double()
        x = x - x.mean(0)
        values, vectors = torch.linalg.eigh(x.T @ x / max(1, len(x) - 1))
        width = self.components.shape[1]
        self.components.copy_(vectors[:, -width:].flip(-1).to(self.components.dtype))
        self.kept.fill_(float(values[-width:].sum() / values.sum().clamp_min(1e-30)))
        self._fit_spread(rows)
        return float(self.kept)

    def use(self, basis: Tensor, rows: Tensor) -> float:
        """Map onto the given ``(D_t, D_s)`` orthonormal axes instead of fitting them; returns the
        share of the (centred) variance of the ``(N, D_t)`` teacher outputs ``rows`` they keep."""
        if basis.shape != self.components.shape:
            raise ModelError(f"teacher map: axes {tuple(basis.shape)}, expected {tuple(self.components.shape)}")
        self.components.copy_(basis.to(self.components))
        x = rows.double()
        x = x - x.mean(0)
        self.kept.fill_(float((x @ basis.double()).square().sum() / x.square().sum().clamp_min(1e-30)))
        self._fit_spread(rows)
        return float(self.kept)

    def _fit_spread(self, rows: Tensor) -> None:
        """The teacher's mean and spread along each mapped axis, for whitened comparison."""
        if not self.whiten:
            return
        mapped = rows.double() @ self.components.double()
        spread = mapped.std(0) if len(mapped) > 1 else torch.ones_like(mapped[0])
        # Axes along which the teacher does not vary at all are not amplified without bound.
        floor = 1e-3 * float(spread.max().clamp_min(1e-12))
        self.mean.copy_(mapped.mean(0).to(self.mean))
        self.scale.copy_((1.0 / spread.clamp_min(floor)).to(self.scale))

    def forward(self, teacher_out: Tensor) -> Tensor:
        return self.compare(teacher_out @ self.components.to(teacher_out.dtype))

    def compare(self, mapped: Tensor) -> Tensor:
        """``(N, D_s)`` vectors in the mapped space as the loss compares them: as they are, or
        whitened (``whiten``). The student's output passes through this too."""
        if not self.whiten:
            return mapped
        return (mapped - self.mean.to(mapped.dtype)) * self.scale.to(mapped.dtype)


def fit_teacher_maps(projectors: nn.ModuleDict, outputs: dict[tuple[int, int], Tensor],
                     basis: Tensor | None = None) -> None:
    """Fit every :class:`TeacherMap` in ``projectors`` on its teacher outputs (by term and pair);
    with ``basis`` (the axes a derived student is expressed in), map onto those axes instead."""
    for (i, j), rows in outputs.items():
        key = teacher_map_key(i, j)
        if key not in projectors:
            continue
        mode = "whiten" if projectors[key].whiten else "pca"
        if basis is not None:
            kept = projectors[key].use(basis, rows)
            log.info("projector %s (loss %d): the student's own %d axes keep %.1f%% of the teacher's variance",
                     mode, i, projectors[key].components.shape[1], 100 * kept)
        else:
            kept = projectors[key].fit(rows)
            log.info("projector %s (loss %d): the top %d components keep %.1f%% of the teacher's variance",
                     mode, i, projectors[key].components.shape[1], 100 * kept)


def teacher_map_outputs(terms: list[LossTerm], projectors: nn.ModuleDict) -> dict[tuple[int, int], str]:
    """The teacher output each fixed map (``projector: pca`` / ``whiten``) is fitted on, by (term, pair)."""
    return {(i, j): t_key for i, term in enumerate(terms) for j, (_, t_key) in enumerate(term.pairs)
            if teacher_map_key(i, j) in projectors}


@torch.no_grad()
def teacher_rows(teacher: Any, inputs: Iterable[dict[str, Any]], names: Iterable[str],
                 limit: int = FIT_EXAMPLES) -> dict[str, Tensor]:
    """The teacher's outputs ``names`` on the first ``limit`` examples of a stream of model inputs
    (batches), as float32 rows on the CPU, to fit fixed maps on."""
    names = sorted(set(names))
    rows: dict[str, list[Tensor]] = {k: [] for k in names}
    count = 0
    for batch in inputs if names else ():
        if count >= limit:
            break
        out = teacher(batch)
        for k in names:
            rows[k].append(out[k].float().cpu())
        count += len(out[names[0]])
    return {k: torch.cat(v)[:limit] for k, v in rows.items() if v}


def _width_axis(x: Tensor) -> int:
    return 1 if x.dim() == 4 else -1


def pair_outputs(terms: list[LossTerm], s_out: dict[str, Tensor], t_out: dict[str, Tensor], task: Any
                 ) -> nn.ModuleDict:
    """Check that each term can compare its outputs on a sample batch; build projectors where needed."""
    if terms:
        task.check_outputs(t_out, "teacher")
    task.check_outputs(s_out, "student")
    projectors = nn.ModuleDict()
    for i, term in enumerate(terms):
        mode = term.projector or term.loss.traits.projector
        for j, (s_key, t_key) in enumerate(term.pairs):
            for role, key, out in (("student", s_key, s_out), ("teacher", t_key, t_out)):
                if key not in out:
                    raise ModelError(f"loss '{term.name}' compares '{key}', which the {role} does not produce "
                                     f"(it produces {sorted(out)})")
            s, t = s_out[s_key], t_out[t_key]
            where = f"loss '{term.name}' ({s_key} vs {t_key})"
            if mode == "never":
                continue
            if mode in ("pca", "whiten"):
                if s.dim() != 2 or t.dim() != 2 or s.shape[-1] >= t.shape[-1]:
                    raise ModelError(f"{where}: projector {mode} maps (N, D) teacher outputs down to a narrower "
                                     f"student; got student {tuple(s.shape)}, teacher {tuple(t.shape)}")
                t_map = TeacherMap(t.shape[-1], s.shape[-1], whiten=mode == "whiten")
                projectors[teacher_map_key(i, j)] = t_map.to(s.device)
                continue
            axis = _width_axis(s)
            s_rest = [d for k, d in enumerate(s.shape) if k != axis % s.dim()]
            t_rest = [d for k, d in enumerate(t.shape) if k != axis % t.dim()] if t.dim() == s.dim() else None
            if s_rest != t_rest:
                raise ModelError(f"{where}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in more "
                                 "than width; pick layers of matching resolution or a relation loss")
            if mode == "always" or s.shape[axis] != t.shape[axis]:
                if term.loss.traits.output == "logits":
                    raise ModelError(f"{where}: student has {s.shape[-1]} classes, teacher {t.shape[-1]}")
                projectors[projector_key(i, j)] = make_projector(s, t).to(s.device)
    return projectors


def _dry_run(terms: list[LossTerm], s_out: dict[str, Tensor], t_out: dict[str, Tensor], projectors: nn.ModuleDict,
             labels: Tensor | None, index: Tensor | None) -> None:
    """Run each term once so that shape errors surface now, named, rather than at step one."""
    with torch.no_grad():
        for i, term in enumerate(terms):
            term.loss.eval()  # no state update (memory banks) from the check
            for j, (s_key, t_key) in enumerate(term.pairs):
                s = s_out[s_key]
                key, t_map = projector_key(i, j), teacher_map_key(i, j)
                if key in projectors:
                    s = projectors[key](s)
                t = t_out[t_key].to(s.dtype)
                if t_map in projectors:
                    t = projectors[t_map](t)
                    s = projectors[t_map].compare(s)
                try:
                    extra = loss_extras(term.loss, s_out, index, t_out)
                    term.loss(s, t, labels, **extra)
                except ValueError as exc:
                    raise ModelError(f"loss '{term.name}' ({s_key} vs {t_key}): {exc}") from None
            term.loss.train()


@dataclass
class Pairing:
    """A student and teacher ready to train together."""

    student: Any
    """The student adapter (with hooks on the layers feature losses read)."""
    teacher: Any
    """The teacher adapter as the loop should call it (with hooks where needed)."""
    terms: list[LossTerm]
    projectors: nn.ModuleDict
    teacher_sample: dict[str, Tensor]
    """The teacher's outputs on the sample batch the pairing was checked on."""
    sample_size: int
    """Examples in that sample batch."""

    def release(self) -> None:
        """Remove the hooks on the teacher (the student's go away with it), and stop both models
        reporting where their tokens end (evaluation and timing need none of it)."""
        if isinstance(self.teacher, TappedAdapter):
            self.teacher.remove()
        for model in (self.student, self.teacher):
            inner = model.adapter if isinstance(model, TappedAdapter) else model
            if isinstance(inner, HFCausalLMAdapter):
                inner.with_token_ends = False


def check_shared_vocabulary(student: Any, teacher: Any) -> None:
    """Token-level losses compare next-token distributions position by position: both models
    must split text into the same tokens with the same ids. Checked up front, by the tokenizers'
    vocabularies and by tokenising a probe text."""
    s_tok, t_tok = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    if s_tok is None or t_tok is None:
        return
    probe = "Distillation: the teacher's tokens, ids and splits must match the student's. 123 ü ∑"
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab == t_vocab and s_tok(probe)["input_ids"] == t_tok(probe)["input_ids"]:
        return
    differ = sum(1 for token, i in t_vocab.items() if s_vocab.get(token) != i)
    raise ModelError(
        f"teacher and student tokenizers differ (teacher {len(t_vocab):,} tokens, student {len(s_vocab):,}, "
        f"{differ:,} teacher tokens missing or at another id in the student's), so token-level losses "
        "(token_kd) cannot compare their next-token distributions. Give the student the teacher's tokenizer, "
        "use cross_vocab_kd (it pairs positions by where tokens end in the text), "
        "or distil at the sequence level, which needs no shared vocabulary: `distill generate` the teacher's "
        "answers, then train the student on them (data.format: jsonl, losses: [], task_loss_weight: 1)."
    )


def prepare_pair(specs: list[LossSpec], default_on: str, student: Any, teacher: Any, sample: dict[str, Any],
                 task: Any, num_examples: int | None = None) -> Pairing:
    """Build the loss terms for ``student`` and ``teacher`` and check them on ``sample`` (a batch).

    ``num_examples`` (the training-set size) sizes the memory banks of losses that keep one.
    """
    terms = build_loss_terms(specs, default_on, student, teacher)
    if terms:
        channels_last_for_inference(teacher.module)  # the teacher only runs forward passes from here on
    if any(term.loss.traits.uses_head and not term.loss.traits.cross_vocab for term in terms):
        check_shared_vocabulary(student, teacher)
    _pair_vocabularies(terms, student, teacher)
    student, teacher = tap_models(terms, student, teacher)
    with torch.no_grad():
        # No loss terms: the student learns from labels alone and the teacher is never run.
        s_out = _first_run(student, "student", sample["inputs"])
        t_out = _first_run(teacher, "teacher", sample["inputs"]) if terms else {}
        try:
            _size_losses(specs, terms, s_out, t_out, num_examples)
            projectors = pair_outputs(terms, s_out, t_out, task)
            labels = sample.get("labels")
            _dry_run(terms, s_out, t_out, projectors, labels if default_on == "logits" and labels is not None else None,
                     sample.get("index"))
        except Exception:
            if isinstance(teacher, TappedAdapter):
                teacher.remove()
            raise
    for i, term in enumerate(terms):
        if term.loss.traits.trainable:
            projectors[f"loss{i}"] = term.loss  # trained and checkpointed with the student, never saved with it
    index = sample.get("index")
    size = len(index) if index is not None else len(next(iter(sample["inputs"].values())))
    return Pairing(student, teacher, terms, projectors, t_out, size)


def _first_run(model: Any, role: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """The model on the first examples of the data: a model that does not fit the data (input
    shape, channels, vocabulary) fails here, with its own reason, before any training."""
    try:
        return model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split())
        shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        raise ModelError(f"the {role} cannot run on the data's first examples{f' {shapes}' if shapes else ''}: "
                         f"{reason}; do its inputs (shape, channels, vocabulary) match the data?") from None


def _pair_vocabularies(terms: list[LossTerm], student: Any, teacher: Any) -> None:
    """Cross-tokenizer terms: both models report where their tokens end, and each term gets the
    student's tokens for each of the teacher's."""
    cross = [term.loss for term in terms if isinstance(term.loss, CrossVocabKDLoss)]
    if not cross:
        return
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, HFCausalLMAdapter) or not model.tokenizer.is_fast:
            raise ModelError(f"cross_vocab_kd compares causal language models with fast tokenizers; the {role} is "
                             f"{type(model).__name__}")
        model.with_token_ends = True
    pieces = token_pieces(student.tokenizer, teacher.tokenizer)
    log.info("cross_vocab_kd: %d of the teacher's %d tokens carried onto the student's %d",
             sum(1 for p in pieces if p), len(pieces), len(student.tokenizer))
    for loss in cross:
        loss.set_pieces(pieces)


def _size_losses(specs: list[LossSpec], terms: list[LossTerm], s_out: dict[str, Tensor], t_out: dict[str, Tensor],
                 num_examples: int | None) -> None:
    """Rebuild losses sized by the data (``crd``) now that widths and the training-set size are known."""
    for spec, term in zip(specs, terms, strict=True):
        accepted = inspect.signature(type(term.loss)).parameters
        if not any(k in accepted for k in _SIZED):
            continue
        if len(term.pairs) != 1:
            raise ModelError(f"loss '{term.name}' compares one pair of outputs, got {len(term.pairs)} layer pairs")
        s_key, t_key = term.pairs[0]
        sizes = {"student_dim": s_out[s_key][0].numel(), "teacher_dim": t_out[t_key][0].numel()}
        if num_examples is not None:
            sizes["num_examples"] = num_examples
        elif "num_examples" in accepted and "num_examples" not in spec.params:
            raise ModelError(f"loss '{term.name}' needs the training-set size (a dataset with len())")
        params = {**spec.params, **{k: v for k, v in sizes.items() if k not in spec.params}}
        try:
            term.loss = type(term.loss)(**params)
        except ValueError as exc:
            raise RecipeError(f"loss '{term.name}': {exc}") from None
