"""Load models: a recipe's model spec (or a saved folder, a Hub id, a ``.gguf`` file) to an adapter."""

from __future__ import annotations

import logging
from typing import Any

import torch

from distill.config import ModelSpec, Recipe
from distill.errors import ModelError
from distill.models.adapters import (
    Adapter,
    HFClassifierAdapter,
    HFEmbeddingAdapter,
    load_torch_classifier,
    require_transformers,
)
from distill.models.causal_lm import HFCausalLMAdapter
from distill.models.ensemble import EnsembleAdapter
from distill.models.gguf import from_pretrained_args, plain_config
from distill.models.sources import resolve_source
from distill.models.static import load_static

__all__ = ["load_hf", "load_model", "load_teacher", "teacher_name", "teacher_settings"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf(kind: str, source: str, *, pooling: str = "mean", normalize: bool = True, max_length: int = 128,
            dtype: str = "float32", trust_remote_code: bool = False, init: str = "pretrained",
            labels: list[str] | None = None) -> Any:
    """Load a Hugging Face model (local folder, Hub id or ``.gguf`` file) and its tokenizer into an adapter.

    ``init="random"`` builds the architecture of the source's config with fresh weights (drawn
    from torch's current seed) instead of loading the saved ones. ``labels`` (classifiers) names
    the classes: a saved head of another size is replaced by a fresh one of ``len(labels)``
    outputs (an encoder without a head gets one), and the config carries the names.
    """
    transformers = require_transformers()
    auto = {"hf-embedding": transformers.AutoModel, "hf-causal-lm": transformers.AutoModelForCausalLM}.get(
        kind, transformers.AutoModelForSequenceClassification)
    heads: dict[str, Any] = {}
    if labels is not None and kind == "hf-classifier":
        heads = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {name: i for i, name in enumerate(labels)}}
    fresh: list[str] = []
    try:
        folder, gguf = from_pretrained_args(source)  # a .gguf file is read from its folder by name
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf)
        if init == "random":
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf,
                                                             **heads)
            module = auto.from_config(plain_config(config), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
        else:
            if heads:
                heads["ignore_mismatched_sizes"] = True
            module, info = auto.from_pretrained(folder, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                output_loading_info=True, **gguf, **heads)
            fresh = sorted(info.get("missing_keys", ()))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load Hugging Face model '{source}': {exc}") from None
    positions = getattr(module.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:  # longer inputs would not run at all
        log.warning("max_length %d is more tokens than %s has positions for: texts are cut at %d", max_length,
                    source, positions)
        max_length = positions
    if kind == "hf-embedding":
        return HFEmbeddingAdapter(module, tokenizer, pooling, normalize, max_length)
    if kind == "hf-causal-lm":
        return HFCausalLMAdapter(module, tokenizer, max_length)
    adapter = HFClassifierAdapter(module, tokenizer, max_length)
    adapter.untrained = fresh
    return adapter


def load_model(spec: ModelSpec, kind: str, source: str | None = None, labels: list[str] | None = None) -> Adapter:
    """Load a teacher or student adapter from its spec (``source`` overrides the spec's);
    ``labels`` names a classifier's classes (see :func:`load_hf`). A teacher of ``members`` is
    loaded as one :class:`~distill.models.ensemble.EnsembleAdapter`."""
    if spec.members and source is None:
        members = [load_model(m.model_copy(update={"kind": kind}), kind, labels=labels) for m in spec.members]
        return EnsembleAdapter(members, spec.weights)
    source = source or spec.source
    if kind == "torch":
        return load_torch_classifier(spec.arch, spec.arch_args, resolve_source(source) if source else None)
    if source is None:
        raise ModelError(f"{kind} model: source is required")
    if kind == "static-embedding":
        return load_static(resolve_source(source))
    return load_hf(kind, resolve_source(source), pooling=spec.pooling, normalize=spec.normalize,
                   max_length=spec.max_length, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                   init=spec.init if source == spec.source else "pretrained", labels=labels)


def load_teacher(recipe: Recipe) -> Adapter:
    """The recipe's teacher, frozen and in eval mode."""
    teacher = load_model(recipe.teacher, recipe.teacher.kind or "torch")
    teacher.module.eval().requires_grad_(False)
    members = teacher.members if isinstance(teacher, EnsembleAdapter) else [teacher]
    untrained = [name for member in members for name in getattr(member, "untrained", [])]
    if untrained and recipe.losses:  # a teacher imitated must know the task
        raise ModelError(f"teacher {teacher_name(recipe.teacher)}: {', '.join(untrained[:4])} are not in its weights, "
                         "so its head would be random and imitating it teaches nothing; fine-tune it on the task "
                         "first (a recipe with no losses and task_loss_weight: 1, as recipes/trec-teacher.yaml), then "
                         "use that run's student (run:NAME)")
    return teacher


def teacher_name(spec: ModelSpec) -> str | None:
    """How reports name a teacher: its source or architecture, or its members' joined by ``+``."""
    if spec.members:
        return " + ".join(str(teacher_name(m)) for m in spec.members)
    return spec.source or spec.arch


def teacher_settings(spec: ModelSpec) -> dict[str, Any]:
    """The settings besides its weights that change a sentence-embedding teacher's outputs (part of
    its cache's identity): pooling, normalisation, truncation, and each member's with the weights."""
    settings: dict[str, Any] = {"pooling": spec.pooling, "normalize": spec.normalize, "max_length": spec.max_length}
    if spec.members:
        settings["members"] = [m.model_dump(mode="json") for m in spec.members] + [spec.weights]
    return settings
