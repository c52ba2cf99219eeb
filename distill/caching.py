"""Which teacher cache a run reads: opened, built if missing, or the reason the teacher runs online.

A run that compares fixed-size teacher outputs (sentence embeddings, class logits, pooled
features) reads them from a :class:`~distill.cache.TeacherCache`; a language-model recipe with
``cache.top_k`` reads a :class:`~distill.logit_cache.TokenLogitCache`. Everything else (an
on-policy run, a teacher sharded between processes, token-level outputs that vary with each
batch's padding, a cache larger than ``cache.max_gb``) runs the teacher online, and
:func:`uncached_reason` says why. ``distill run`` and ``distill cache`` both come here, so a
cache built ahead of a run is the one the run reads.
"""

from __future__ import annotations

import logging
from typing import Any

from distill.cache import TeacherCache, model_fingerprint
from distill.config import Recipe
from distill.errors import RecipeError
from distill.launch import process_state, sharded_teacher
from distill.logit_cache import TokenLogitCache
from distill.losses.tokens import TokenKDLoss
from distill.models.adapters import Adapter
from distill.models.load import teacher_settings
from distill.pairing import Pairing, build_loss_terms

__all__ = ["cache_for", "open_logit_cache", "open_teacher_cache", "uncached_reason"]

log = logging.getLogger(__name__)


def open_teacher_cache(recipe: Recipe, teacher: Adapter, task: Any, names: list[str] | None = None
                       ) -> TeacherCache:
    """The verified teacher-output cache of this teacher on this task's training set (built if needed).

    ``names`` are the teacher outputs to hold (default: the outputs the recipe's losses compare);
    ``teacher`` must produce them (a :class:`~distill.features.TappedAdapter` for layers). With
    several processes each runs the teacher on its share of the examples.
    """
    procs = process_state(recipe.train)
    spec = recipe.teacher
    teacher_id = model_fingerprint(teacher.module, teacher_settings(spec))
    if names is None:
        names = sorted({t.on for t in build_loss_terms(recipe.losses, task.output) if t.layers is None})
    return TeacherCache.open_or_build(
        recipe.cache.dir, teacher_id, task.fingerprint(), teacher=teacher, batches=task.train.batch,
        lengths=task.lengths(), names=names, batch_size=recipe.evaluate.batch_size,
        rank=procs.process_index, world=procs.num_processes, barrier=procs.wait_for_everyone,
    )


def open_logit_cache(recipe: Recipe, teacher: Adapter, task: Any, rank: int | None = None,
                     world: int | None = None) -> TokenLogitCache:
    """The teacher's top-k log-probabilities on the training set (``cache.top_k``), built if needed.

    The temperature is the ``token_kd`` terms' (they must agree: the log-probabilities are
    stored at it). ``rank`` of ``world`` processes builds every ``world``-th shard (default: this
    process's place among the run's processes); they then wait for each other, and the cache
    is opened whole.
    """
    procs = process_state(recipe.train)
    rank = procs.process_index if rank is None else rank
    world = procs.num_processes if world is None else world
    # The temperature comes from the built losses themselves, so it is the one they train at.
    token_losses = [t.loss for t in build_loss_terms(recipe.losses, "hidden") if isinstance(t.loss, TokenKDLoss)]
    temperatures = {float(loss.temperature) for loss in token_losses}
    if len(temperatures) > 1:
        raise RecipeError(f"cache.top_k: the token_kd terms use different temperatures {sorted(temperatures)}; "
                          "one logit cache holds one temperature")
    if recipe.cache.top_k is None:
        raise RecipeError("cache.top_k: not set; give the number of teacher tokens to keep per position "
                          "(0 for the whole distribution)")
    spec = recipe.teacher
    teacher_id = model_fingerprint(teacher.module, {"kind": spec.kind, "max_length": spec.max_length})
    return TokenLogitCache.open_or_build(
        recipe.cache.dir, teacher_id, task.fingerprint(), teacher=teacher, batches=task.train.batch,
        examples=len(task.train), k=recipe.cache.top_k, temperature=temperatures.pop() if temperatures else 1.0,
        sample=recipe.cache.sample,
        batch_size=recipe.evaluate.batch_size, shard_size=recipe.cache.shard_size, rank=rank, world=world,
        barrier=procs.wait_for_everyone if world > 1 and world == procs.num_processes else None,
    )


def _cached_outputs(pair: Pairing) -> list[str]:
    """The teacher outputs the pairing's loss terms compare, by name."""
    return sorted({t_key for term in pair.terms for _, t_key in term.pairs})


def uncached_reason(recipe: Recipe, pair: Pairing, task: Any) -> str | None:
    """Why a run of ``recipe`` runs its teacher online instead of reading a cache (``None``: it reads one).

    Raises:
        RecipeError: ``cache.top_k`` (a logit cache) beside distillation losses that are not ``token_kd``.
    """
    if not recipe.cache.enabled:
        return "cache.enabled is false"
    if recipe.on_policy is not None:
        return "on_policy: the student writes part of each batch as it trains"
    if sharded_teacher(recipe.train, process_state(recipe.train).num_processes):
        return "train.shard_teacher: the teacher runs split between the processes"
    if not pair.terms:
        return "the recipe has no distillation losses"
    if recipe.cache.top_k is not None:
        if sum(term.loss.traits.uses_head for term in pair.terms) != len(pair.terms):
            raise RecipeError("cache.top_k: a logit cache serves token_kd terms only; this recipe has other "
                              "distillation losses (set cache.top_k: null to run the teacher online)")
        return None
    names = _cached_outputs(pair)
    out = pair.teacher_sample
    rows = out[task.output].shape[0]
    # Token-level tensors vary in length with each batch's padding; only fixed-size rows are cached.
    uncacheable = [n for n in names if out[n].shape[0] != rows or ("token_mask" in out and out[n].dim() > 2)]
    if uncacheable:
        return f"the token-level teacher outputs {uncacheable} change shape with each batch's padding"
    size_gb = sum(out[name][0].numel() * 4 for name in names) * rows / pair.sample_size * len(task.train) / 1e9
    if size_gb > recipe.cache.max_gb:
        size = f"{size_gb:.1f} GB" if size_gb >= 1 else f"{size_gb * 1e3:.3g} MB"
        return f"the teacher outputs {names} would take {size} (cache.max_gb {recipe.cache.max_gb:g})"
    return None


def cache_for(recipe: Recipe, pair: Pairing, task: Any) -> TeacherCache | TokenLogitCache | None:
    """The teacher cache for the pairing's loss terms, built if needed, or ``None`` (teacher online)."""
    reason = uncached_reason(recipe, pair, task)
    if reason is not None:
        if recipe.cache.enabled and pair.terms:
            log.info("no teacher cache: %s; the teacher runs online", reason)
        return None
    if recipe.cache.top_k is not None:
        return open_logit_cache(recipe, pair.teacher, task)
    return open_teacher_cache(recipe, pair.teacher, task, _cached_outputs(pair))
