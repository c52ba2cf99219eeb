"""A recipe's student: loaded from its spec, or derived from the teacher.

:func:`derive_student` is the one place that picks the derivation (a static token table, a
causal LM or an encoder); :func:`build_student` gathers what a derivation reads from the task.
A run builds its student once (:class:`BuiltStudent`) and hands each role a fresh copy.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch import nn

from distill.config import DeriveSpec, Recipe
from distill.errors import ModelError, RecipeError
from distill.models.adapters import (
    Adapter,
    HFClassifierAdapter,
    HFEmbeddingAdapter,
    TorchClassifierAdapter,
    data_arch_args,
)
from distill.models.causal_lm import HFCausalLMAdapter
from distill.models.derive import derive_encoder
from distill.models.derive_lm import derive_causal_lm
from distill.models.ensemble import EnsembleAdapter
from distill.models.load import load_model
from distill.models.static import derive_static, vocabulary_of

__all__ = ["BuiltStudent", "build_student", "derive", "derive_student"]


def derive_student(teacher: Any, spec: DeriveSpec, calibration: Iterable[dict[str, Any]],
                   keep_tokens: list[int] | None = None, *, kind: str | None = None,
                   texts: list[str] | None = None) -> Adapter:
    """Build a student from the teacher by keeping layers, channels, heads, neurons and tokens.

    Args:
        teacher: The teacher adapter (its model is not modified).
        spec: What to keep.
        calibration: Input batches used to rank channels, heads and neurons (only read when
            the student is narrower than the teacher).
        keep_tokens: Token ids to keep (vocabulary pruning, see
            :func:`distill.models.static.vocabulary_of`); ``None`` keeps all.
        kind: The student's kind; ``static-embedding`` derives a table of token vectors
            (:func:`~distill.models.static.derive_static`), any other a transformer of the
            teacher's kind (:func:`~distill.models.derive_lm.derive_causal_lm` for a causal LM,
            :func:`~distill.models.derive.derive_encoder` for an encoder).
        texts: The training texts, whose token frequencies weight a static student's vectors.

    Returns:
        The student's adapter, sharing the teacher's tokenizer unless the vocabulary is pruned.
    """
    if kind == "static-embedding":
        return derive_static(teacher, spec.hidden_size or 256, keep_tokens, texts, spec.sif)
    if isinstance(teacher, HFCausalLMAdapter):
        if keep_tokens is not None:
            raise RecipeError("student.derive.vocab: a causal-LM student keeps the teacher's vocabulary "
                              "(token-level losses compare whole next-token distributions)")
        return derive_causal_lm(teacher, spec, calibration)
    return derive_encoder(teacher, spec, calibration, keep_tokens)


def derive(teacher: nn.Module, tokenizer: Any, *, layers: list[int] | None = None, hidden_size: int | None = None,
           num_attention_heads: int | None = None, intermediate_size: int | None = None,
           texts: list[str] | None = None, max_length: int = 128, batch_size: int = 16) -> nn.Module:
    """A student derived from a ``transformers`` teacher, for the Python API (``distill.derive``):
    what ``student.derive`` does in a recipe. Layers are kept as copies of the teacher's; a
    narrower width keeps the channels, heads and neurons most active on ``texts``.

    Args:
        teacher: A ``transformers`` encoder (``AutoModel``), sequence classifier or causal LM.
        tokenizer: Its tokenizer.
        layers, hidden_size, num_attention_heads, intermediate_size: As in a recipe's ``student.derive``.
        texts: Calibration texts (needed only when the width shrinks; 8 batches are read).
        max_length: Truncation of the calibration texts, in tokens.
        batch_size: Calibration batch size.

    Returns:
        The student module, of the teacher's class (it shares the teacher's tokenizer).
    """
    spec = DeriveSpec(layers=layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                      intermediate_size=intermediate_size)
    narrower = any(v is not None for v in (hidden_size, num_attention_heads, intermediate_size))
    if narrower and not texts:
        raise RecipeError("derive: a narrower student keeps the channels most active on calibration texts; "
                          "pass texts=[...] (a few hundred of the training texts)")
    name = type(teacher).__name__
    if getattr(teacher, "config", None) is None or not hasattr(teacher, "save_pretrained"):
        raise ModelError(f"derive: the teacher ({name}) is not a transformers model; derive builds students of "
                         "transformers encoders, sequence classifiers and causal LMs (a plain module's student is "
                         "yours to build)")
    adapter: Any
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        adapter = HFCausalLMAdapter(teacher, tokenizer, max_length)
    elif name.endswith("ForSequenceClassification"):
        adapter = HFClassifierAdapter(teacher, tokenizer, max_length)
    else:
        adapter = HFEmbeddingAdapter(teacher, tokenizer, "mean", True, max_length)
    calibration = [{"text": list(texts[i : i + batch_size])} for i in range(0, min(len(texts), 8 * batch_size),
                                                                              batch_size)] if texts else []
    return derive_student(adapter, spec, calibration).module


def _calibration(task: Any, spec: DeriveSpec, batch_size: int) -> Iterator[dict[str, Any]]:
    """The inputs of the first ``spec.calibration_batches`` training batches."""
    n = len(task.train)
    for i in range(min(spec.calibration_batches, -(-n // batch_size))):
        yield task.train.batch(range(i * batch_size, min((i + 1) * batch_size, n)))["inputs"]


def build_student(recipe: Recipe, teacher: Adapter, task: Any) -> Adapter:
    """Derive the student from the teacher (or from ``student.source``), or load/build it, with the
    recipe's seed."""
    set_seed(recipe.seed)
    spec = recipe.student.derive
    labels = getattr(task, "label_names", None)  # a text classification task's classes
    if spec is None:
        model_spec = recipe.student
        if recipe.student_kind == "torch" and model_spec.source is None and hasattr(task, "arch_defaults"):
            built = data_arch_args(model_spec.arch, model_spec.arch_args, task.arch_defaults())
            model_spec = model_spec.model_copy(update={"arch_args": built})
        student = load_model(model_spec, recipe.student_kind, labels=labels)
        if isinstance(student, TorchClassifierAdapter) and hasattr(task, "preprocessing"):
            student.preprocessing = task.preprocessing()
        return student
    # The model the student is cut from: the teacher (the first of its members), or the recipe's
    # student.source (a smaller sibling of the teacher, loaded whole first).
    origin = teacher.primary if isinstance(teacher, EnsembleAdapter) else teacher
    base = origin if recipe.student.source is None else load_model(
        recipe.student.model_copy(update={"derive": None}), recipe.student_kind)
    texts = task.train_texts() if hasattr(task, "train_texts") else None
    keep = None
    if spec.vocab == "data":
        if texts is None:
            raise RecipeError("student.derive.vocab: 'data' needs a text task")
        keep = vocabulary_of(base.tokenizer, texts)  # type: ignore[attr-defined]
    student = derive_student(base, spec, _calibration(task, spec, recipe.train.batch_size), keep,
                             kind=recipe.student_kind, texts=texts)
    config = getattr(student.module, "config", None)
    if labels is not None and getattr(config, "num_labels", None) == len(labels):
        config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    return student


@dataclass(frozen=True)
class BuiltStudent:
    """A run's student, built once, and the random state its build left behind.

    Each role of a run (the pairing check, the distilled student, the baseline) takes a
    :meth:`fresh` copy: the same starting weights, and the random state right after a build,
    so that what the role draws next (projector weights, dropout in the pairing check) is what
    it would draw had it built the student itself.
    """

    student: Adapter
    seed: int
    random_state: tuple[Any, Any, torch.Tensor]
    """Python's, NumPy's and torch's CPU generator states after the build."""

    @classmethod
    def build(cls, recipe: Recipe, teacher: Adapter, task: Any) -> BuiltStudent:
        """:func:`build_student`, on the CPU (the teacher must be there)."""
        student = build_student(recipe, teacher, task)
        return cls(student, recipe.seed, (random.getstate(), np.random.get_state(), torch.get_rng_state()))

    def fresh(self) -> Adapter:
        """A copy of the student with its own weights, the random generators as the build left them."""
        # Seeding resets every generator the build does not draw from (CUDA's among them), as a
        # new build would; the CPU generators it drew from are then put where it left them.
        set_seed(self.seed)
        python, numpy, cpu = self.random_state
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        student = copy.copy(self.student)
        student.module = copy.deepcopy(self.student.module)
        return student
