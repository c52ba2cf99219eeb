"""Run a recipe end to end: models, data, teacher cache, training, baseline, evaluation, report.

Each phase leaves its result in the run folder, so running the same recipe again picks up
where it stopped: a finished training is not repeated, an interrupted one resumes from its
last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from distill.cache import TeacherCache, model_fingerprint
from distill.config import ModelSpec, Recipe, apply_overrides, load_recipe, parse_recipe
from distill.engine import ShuffledBatches, make_accelerator, train
from distill.errors import ModelError, RecipeError, RunFolderError
from distill.evaluate import measure, time_models
from distill.models.adapters import Adapter, load_hf, load_torch_classifier
from distill.models.derive import derive_student
from distill.models.sources import resolve_source
from distill.models.static import derive_static, load_static, vocabulary_of
from distill.pairing import Pairing, build_loss_terms, pair_outputs, prepare_pair
from distill.report import write_report
from distill.tasks import build_task

__all__ = [
    "RunResult",
    "build_loss_terms",
    "evaluate_run",
    "load_model",
    "load_teacher",
    "open_teacher_cache",
    "pair_outputs",
    "report_run",
    "run",
]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run produced."""

    folder: Path
    report: Path
    models: dict[str, dict[str, Any]]


def load_model(spec: ModelSpec, kind: str, source: str | None = None) -> Adapter:
    """Load a teacher or student adapter from its spec (``source`` overrides the spec's)."""
    source = source or spec.source
    if kind == "torch":
        return load_torch_classifier(spec.arch, spec.arch_args, resolve_source(source) if source else None)
    if source is None:
        raise ModelError(f"{kind} model: source is required")
    if kind == "static-embedding":
        return load_static(resolve_source(source))
    return load_hf(kind, resolve_source(source), pooling=spec.pooling, normalize=spec.normalize,
                   max_length=spec.max_length, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)


def build_student(recipe: Recipe, teacher: Adapter, task: Any) -> Adapter:
    """Derive the student from the teacher, or load/build it, with the recipe's seed."""
    set_seed(recipe.seed)
    derive = recipe.student.derive
    if derive is None:
        return load_model(recipe.student, recipe.student_kind)
    keep = None
    if derive.vocab == "data":
        if not hasattr(task, "train_texts"):
            raise RecipeError("student.derive.vocab: 'data' needs a text task")
        keep = vocabulary_of(teacher.tokenizer, task.train_texts())  # type: ignore[attr-defined]
    if recipe.student_kind == "static-embedding":
        texts = task.train_texts() if hasattr(task, "train_texts") else None
        return derive_static(teacher, derive.hidden_size or 256, keep, texts, derive.sif)
    bs = recipe.train.batch_size
    calibration = [task.train.batch(range(i * bs, min((i + 1) * bs, len(task.train))))["inputs"]
                   for i in range(min(derive.calibration_batches, -(-len(task.train) // bs)))]
    return derive_student(teacher, derive, calibration, keep)  # type: ignore[arg-type]


def _prepare_folder(recipe: Recipe) -> Path:
    folder = recipe.run_dir()
    marker = folder / "run.json"
    identity = recipe.identity()
    if marker.is_file():
        held = json.loads(marker.read_text())
        if held.get("identity") != identity:
            raise RunFolderError(
                f"{folder} holds a run of another recipe ('{held.get('name')}', identity {held.get('identity')}; "
                f"this one is '{recipe.name}', identity {identity}). Nothing was changed: pick another "
                "folder with --set output_dir=..., or delete that one to start over."
            )
    elif folder.exists() and any(folder.iterdir()):
        raise RunFolderError(f"{folder} exists and is not a distill run folder; pick another output_dir")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"name": recipe.name, "identity": identity}) + "\n")
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    return folder


def _save_atomic(model: Adapter, target: Path) -> None:
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _pairing(recipe: Recipe, teacher: Adapter, task: Any, distilled: bool) -> Pairing:
    """Build the student and check, on a few real examples, that it can be compared with the teacher."""
    student = build_student(recipe, teacher, task)
    sample = task.train.batch(range(min(4, len(task.train))))
    specs = recipe.losses if distilled else []
    return prepare_pair(specs, task.output, student, teacher, sample, task, len(task.train))


def _train_one(recipe: Recipe, role: str, teacher: Adapter, task: Any, cache: TeacherCache | None,
               folder: Path) -> Adapter:
    """Train the distilled student (``role='student'``) or the no-teacher baseline, or load it if done."""
    saved = folder / role
    if (saved / "distill.json").is_file():
        log.info("%s already trained: %s", role, saved)
        return load_model(recipe.student, recipe.student_kind, str(saved))
    accelerator = make_accelerator(recipe.train)
    teacher.module.to(accelerator.device)
    distilled = role == "student"
    pair = _pairing(recipe, teacher, task, distilled)
    try:
        result = train(
            student=pair.student, task=task, terms=pair.terms, projectors=pair.projectors,
            batches=ShuffledBatches(task.train, recipe.train.batch_size, recipe.seed, accelerator.process_index,
                                    accelerator.num_processes,
                                    task.lengths() if recipe.train.group_by_length else None),
            teacher=pair.teacher if distilled else None, cache=cache if distilled else None,
            task_weight=recipe.task_loss_weight if distilled else 1.0, spec=recipe.train, seed=recipe.seed,
            folder=folder / "train" / role, accelerator=accelerator, desc=role,
        )
    finally:
        pair.release()
    if accelerator.is_main_process:
        _save_atomic(pair.student, saved)
        (saved / "distill.json").write_text(json.dumps({"role": role, "recipe": recipe.name, **result}) + "\n")
    return pair.student


def load_teacher(recipe: Recipe) -> Adapter:
    """The recipe's teacher, frozen and in eval mode."""
    teacher = load_model(recipe.teacher, recipe.teacher.kind or "torch")
    teacher.module.eval().requires_grad_(False)
    return teacher


def open_teacher_cache(recipe: Recipe, teacher: Adapter, task: Any, names: list[str] | None = None
                       ) -> TeacherCache:
    """The verified teacher-output cache of this teacher on this task's training set (built if needed).

    ``names`` are the teacher outputs to hold (default: the outputs the recipe's losses compare);
    ``teacher`` must produce them (a :class:`~distill.features.TappedAdapter` for layers).
    """
    spec = recipe.teacher
    teacher_id = model_fingerprint(teacher.module, {"pooling": spec.pooling, "normalize": spec.normalize,
                                                    "max_length": spec.max_length})
    if names is None:
        names = sorted({t.on for t in build_loss_terms(recipe.losses, task.output) if t.layers is None})
    return TeacherCache.open_or_build(
        recipe.cache.dir, teacher_id, task.fingerprint(), teacher=teacher, batches=task.train.batch,
        lengths=task.lengths(), names=names, batch_size=recipe.evaluate.batch_size,
    )


def _cache_for(recipe: Recipe, pair: Pairing, task: Any) -> TeacherCache | None:
    """The teacher cache for these loss terms, or ``None`` (teacher online) when off or too large."""
    if not recipe.cache.enabled or not pair.terms:
        return None
    names = sorted({t_key for term in pair.terms for _, t_key in term.pairs})
    out = pair.teacher_sample
    rows = out[task.output].shape[0]
    # Token-level tensors vary in length with each batch's padding; only fixed-size rows are cached.
    uncacheable = [n for n in names if out[n].shape[0] != rows or ("token_mask" in out and out[n].dim() > 2)]
    if uncacheable:
        log.info("token-level teacher outputs %s are not cached: the teacher runs online", uncacheable)
        return None
    per_example = sum(out[name][0].numel() * 4 for name in names) * rows / pair.sample_size
    size_gb = per_example * len(task.train) / 1e9
    if size_gb > recipe.cache.max_gb:
        log.info("the teacher outputs %s would take %.1f GB (cache.max_gb %.1f): the teacher runs online",
                 names, size_gb, recipe.cache.max_gb)
        return None
    return open_teacher_cache(recipe, pair.teacher, task, names)


def _coerce(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            return parse_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides))
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(apply_overrides(dict(recipe), overrides or []))
    return load_recipe(recipe, overrides)


def run(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunResult:
    """Run a recipe (object, dict or YAML path) to the end and return where the report is.

    Running it again on the same folder resumes an interrupted run or reuses finished phases.
    """
    recipe = _coerce(recipe, overrides)
    folder = _prepare_folder(recipe)
    task = build_task(recipe.task, recipe.data)
    teacher = load_teacher(recipe)
    pair = _pairing(recipe, teacher, task, True)  # fail fast, before the teacher cache
    try:
        trained = (folder / "student" / "distill.json").is_file()
        cache = None if trained else _cache_for(recipe, pair, task)
    finally:
        pair.release()
    _train_one(recipe, "student", teacher, task, cache, folder)
    if recipe.baseline:
        _train_one(recipe, "baseline", teacher, task, None, folder)
    models = evaluate_run(folder, recipe, task, teacher)
    report = report_run(folder)
    return RunResult(folder, report, models)


def _machine() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def evaluate_run(folder: Path, recipe: Recipe | None = None, task: Any = None, teacher: Adapter | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Measure teacher, student and baseline of a finished run and write ``eval.json``."""
    recipe = recipe or load_recipe(folder / "recipe.yaml")
    task = task or build_task(recipe.task, recipe.data)
    teacher = teacher or load_teacher(recipe)
    teacher.module.to("cpu")
    adapters: dict[str, Adapter] = {"teacher": teacher}
    models: dict[str, dict[str, Any]] = {"teacher": measure(teacher, task)}
    for role in ("student", "baseline"):
        saved = folder / role
        if (saved / "distill.json").is_file():
            adapters[role] = load_model(recipe.student, recipe.student_kind, str(saved))
            models[role] = measure(adapters[role], task, saved)
    if "student" not in models:
        raise RunFolderError(f"{folder}: no trained student yet; run the recipe first")
    for role, timing in time_models(adapters, task, recipe.evaluate).items():
        models[role].update(timing)
    losses = ", ".join(f"{s.weight:g} x {s.name}{s.params or ''}" for s in recipe.losses)
    if recipe.task_loss_weight:
        losses += f", {recipe.task_loss_weight:g} x task loss"
    student = recipe.student.derive.model_dump(exclude_none=True) if recipe.student.derive else (
        recipe.student.arch or recipe.student.source)
    steps = json.loads((folder / "student" / "distill.json").read_text())["steps"]
    summary = {
        "recipe": recipe.name, "metric": task.metric, "higher_is_better": getattr(task, "higher_is_better", True),
        "teacher": recipe.teacher.source or recipe.teacher.arch,
        "student": f"`{student}`", "data": str(recipe.data.path), "losses": losses, "steps": steps,
        "machine": _machine(), "models": models,
    }
    (folder / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return models


def report_run(folder: Path) -> Path:
    """(Re)write the report of a run from its ``eval.json`` and metrics."""
    eval_file = folder / "eval.json"
    if not eval_file.is_file():
        raise RunFolderError(f"{folder}: no eval.json; run 'distill eval {folder}' first")
    summary = json.loads(eval_file.read_text())
    histories = {}
    for role in ("student", "baseline"):
        path = folder / "train" / role / "metrics.jsonl"
        if path.is_file():
            histories[role] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return write_report(folder, summary, histories)
