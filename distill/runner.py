"""Run a recipe end to end: models, data, teacher cache, training, baseline, evaluation, report.

Each phase leaves its result in the run folder, so running the same recipe again picks up
where it stopped: a finished training is not repeated, an interrupted one resumes from its
last checkpoint. The commands on a finished run folder (``eval``, ``report``, ``export``) are
orchestrated here too; loading models, exporting, measuring deployments and writing the model
card are jobs of the modules they call.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import PartialState

from distill.batches import ShuffledBatches, per_process_batch
from distill.cache import TeacherCache
from distill.caching import cache_for, uncached_reason
from distill.card import read_exports, write_model_card
from distill.checkpoint import BEST, checkpoints, copy_model_atomic, save_model_atomic
from distill.config import Recipe, apply_overrides, load_recipe, parse_recipe
from distill.engine import make_accelerator, train
from distill.errors import DataError, DistillError, RecipeError, RunFolderError
from distill.evaluate import measure, suite_scores, time_models
from distill.launch import process_state, shard_frozen, sharded_teacher, sync_batchnorm
from distill.locks import locked
from distill.logit_cache import TokenLogitCache
from distill.models.adapters import Adapter
from distill.models.load import load_model, load_teacher, teacher_name
from distill.models.static import StaticEmbeddingAdapter
from distill.models.student import BuiltStudent
from distill.pairing import (
    FIT_EXAMPLES,
    Pairing,
    TeacherMap,
    build_loss_terms,
    fit_teacher_maps,
    pair_outputs,
    prepare_pair,
    teacher_map_outputs,
    teacher_rows,
)
from distill.preflight import missing_paths, not_found
from distill.records import read_evaluation, read_json, read_json_lines
from distill.report import write_report, write_stages_report
from distill.suite import check_tasks, select_tasks
from distill.tasks import EmbeddingTask, build_task
from distill.tasks.base import higher_is_better

__all__ = ["RunResult", "as_recipe", "build_caches", "build_loss_terms", "evaluate_run", "final_folder", "locked",
           "pair_outputs", "report_run", "run"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run produced."""

    folder: Path
    report: Path
    models: dict[str, dict[str, Any]]


def _prepare_folder(recipe: Recipe, procs: PartialState) -> Path:
    """Check the run folder (every process: each raises the same error) and claim it (the main one)."""
    folder = recipe.run_dir()
    marker = folder / "run.json"
    identity = recipe.identity()
    if marker.is_file():
        try:
            held = json.loads(marker.read_text())
            if not isinstance(held, dict):
                raise ValueError(marker)
        except ValueError:  # a damaged marker: the folder is this recipe's unless it holds results
            held = {"name": "?", "identity": f"unknown: {marker} is damaged"}
        if held.get("identity") != identity and _holds_results(folder) and not _evaluation_changed(folder, recipe):
            raise RunFolderError(
                f"{folder} holds a run of another recipe ('{held.get('name')}', identity {held.get('identity')}; "
                f"this one is '{recipe.name}', identity {identity}). Nothing was changed: pick another "
                "folder with --set output_dir=..., or delete that one to start over."
            )
    elif folder.exists() and any(folder.iterdir()):
        raise RunFolderError(f"{folder} exists and is not a distill run folder; pick another output_dir")
    procs.wait_for_everyone()  # all have looked before the main process writes
    if procs.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"name": recipe.name, "identity": identity}) + "\n")
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
    procs.wait_for_everyone()
    return folder


def _evaluation_changed(folder: Path, recipe: Recipe) -> bool:
    """Whether ``folder``'s recipe differs from ``recipe`` in its ``evaluate`` section alone: the
    same training, reused, and the run measured again as ``recipe`` now says (another suite task,
    say)."""
    try:
        held = load_recipe(folder / "recipe.yaml")
    except DistillError:
        return False
    return held.model_copy(update={"evaluate": recipe.evaluate}).identity() == recipe.identity()


def _holds_results(folder: Path) -> bool:
    """Whether a claimed run folder holds anything a run produced. A run that stopped before
    producing anything (a model or data that did not load) leaves only its claim, and a
    corrected recipe may take the folder over."""
    claim = {"run.json", "recipe.yaml"}
    return any(p.is_file() and p.name not in claim and not p.name.endswith(".lock") for p in folder.rglob("*"))


def _pairing(recipe: Recipe, built: BuiltStudent, teacher: Adapter, task: Any, distilled: bool,
             procs: PartialState) -> Pairing:
    """A fresh copy of the student, checked on a few real examples to be comparable with the teacher."""
    student = built.fresh()
    student.module = sync_batchnorm(student.module, procs)
    sample = task.train.batch(range(min(4, len(task.train))))
    specs = recipe.losses if distilled else []
    return prepare_pair(specs, task.output, student, teacher, sample, task, len(task.train))


def _train_one(recipe: Recipe, role: str, built: BuiltStudent, teacher: Adapter, task: Any,
               cache: TeacherCache | TokenLogitCache | None, folder: Path, procs: PartialState) -> Adapter:
    """Train the distilled student (``role='student'``) or the no-teacher baseline, from a fresh
    copy of the run's student, or load it if done."""
    saved = folder / role
    if (saved / "distill.json").is_file():
        log.info("%s already trained: %s", role, saved)
        return load_model(recipe.student, recipe.student_kind, str(saved))
    accelerator = make_accelerator(recipe.train)
    distilled = role == "student"
    pair = _pairing(recipe, built, teacher, task, distilled, procs)
    if any(isinstance(m, TeacherMap) for m in pair.projectors.values()):
        basis = pair.student.teacher_basis if isinstance(pair.student, StaticEmbeddingAdapter) else None
        fit_teacher_maps(pair.projectors, _teacher_rows(pair, cache, task, recipe.evaluate.batch_size), basis)
    # After the pairing check, which runs both models on the CPU.
    if distilled and sharded_teacher(recipe.train, accelerator.num_processes):
        local, total = shard_frozen(teacher.module, accelerator.device, accelerator.num_processes)
        log.info("teacher sharded across %d processes: this one holds %d of its %d parameters",
                 accelerator.num_processes, local, total)
    elif not _is_sharded(teacher.module):
        teacher.module.to(accelerator.device)
    data, lengths = task.train, task.lengths() if recipe.train.group_by_length else None
    labelled = getattr(task, "labelled_examples", len(data))
    if not distilled and labelled < len(data):  # without a teacher, data.mix's unlabelled texts teach nothing
        data, lengths = data.head(labelled), lengths[:labelled] if lengths else None
    try:
        result = train(
            student=pair.student, task=task, terms=pair.terms, projectors=pair.projectors,
            batches=ShuffledBatches(data, recipe.train.batch_size, recipe.seed, accelerator.process_index,
                                    accelerator.num_processes, lengths),
            teacher=pair.teacher if distilled else None, cache=cache if distilled else None,
            task_weight=recipe.task_loss_weight if distilled else 1.0, seed=recipe.seed,
            spec=recipe.train if recipe.train.project else recipe.train.model_copy(update={"project": recipe.name}),
            folder=folder / "train" / role, accelerator=accelerator, desc=role,
            on_policy=recipe.on_policy if distilled else None,
        )
    finally:
        pair.release()
    if accelerator.is_main_process:
        save_model_atomic(pair.student, saved)
        (saved / "distill.json").write_text(json.dumps({"role": role, "recipe": recipe.name, **result}) + "\n")
        _drop_checkpoints(folder / "train" / role / "checkpoints", recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return pair.student


def _drop_checkpoints(folder: Path, keep: int | str) -> None:
    """Once a model is saved, delete the checkpoints ``train.keep_checkpoints`` does not keep
    (with ``none``, ``train.keep_best``'s copy too: the saved model is that student)."""
    if isinstance(keep, int):
        return
    for old in checkpoints(folder)[: -1 if keep == "final" else None]:
        shutil.rmtree(old, ignore_errors=True)
    if keep == "none":
        shutil.rmtree(folder.parent / BEST, ignore_errors=True)


def _teacher_rows(pair: Pairing, cache: TeacherCache | TokenLogitCache | None, task: Any, batch_size: int
                  ) -> dict[tuple[int, int], torch.Tensor]:
    """The teacher's outputs on the training data for each (term, pair) with a ``projector: pca``
    map to fit: from the cache when it holds them, else from the teacher on up to
    :data:`~distill.pairing.FIT_EXAMPLES` examples. Other terms' outputs (token-level ones among
    them) are not read."""
    keys = teacher_map_outputs(pair.terms, pair.projectors)
    stored = cache.arrays if isinstance(cache, TeacherCache) else {}
    count = min(len(task.train), FIT_EXAMPLES)
    batches = (task.train.batch(range(start, min(start + batch_size, count)))["inputs"]
               for start in range(0, count, batch_size))
    rows = teacher_rows(pair.teacher, batches, {k for k in keys.values() if k not in stored}, count)
    rows.update({k: torch.from_numpy(np.array(stored[k], dtype=np.float32)).flatten(0, 1)
                 for k in set(keys.values()) if k in stored})
    return {ij: rows[k] for ij, k in keys.items()}


def _save_untrained(recipe: Recipe, built: BuiltStudent, folder: Path, procs: PartialState) -> None:
    """Save the student as built, before any training, as the baseline of a label-free run."""
    saved = folder / "baseline"
    if procs.is_main_process and not (saved / "distill.json").is_file():
        save_model_atomic(built.fresh(), saved)
        info = {"role": "baseline", "recipe": recipe.name, "untrained": True, "steps": 0, "eval": []}
        (saved / "distill.json").write_text(json.dumps(info) + "\n")
    procs.wait_for_everyone()


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def build_caches(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None
                 ) -> list[tuple[str, TeacherCache | TokenLogitCache | str]]:
    """``distill cache``: build (or finish, or verify) the teacher caches a run of the recipe will
    read, without training: a language model's logit cache (``cache.top_k``), or the teacher's
    outputs that the recipe's losses compare, each stage's in turn for a staged recipe.

    Returns:
        ``(recipe or stage name, cache)`` in order; instead of a cache, the reason a run reads none
        (its teacher runs online) or cannot be cached yet (a later stage, whose student is the
        one the stage before it has not trained yet).
    """
    recipe = as_recipe(recipe, overrides)
    if missing := missing_paths(recipe):
        raise DataError(not_found(recipe.name, missing))
    procs = process_state(recipe.train)
    found: list[tuple[str, TeacherCache | TokenLogitCache | str]] = []
    for i, stage in enumerate(recipe.stage_recipes() or [recipe]):
        if i and not Path(stage.student.source or "", "distill.json").is_file():
            found.append((stage.name, f"its student is the one stage {i} trains, not trained yet: "
                                      "the run builds this cache when it gets there"))
            continue
        task = build_task(stage.task, stage.data)
        teacher = load_teacher(stage)
        pair = _pairing(stage, BuiltStudent.build(stage, teacher, task), teacher, task, True, procs)
        try:
            reason = uncached_reason(stage, pair, task)
            if reason is None:
                teacher.module.to(procs.device)
            found.append((stage.name, reason or cache_for(stage, pair, task)))
        finally:
            teacher.module.to("cpu")
            pair.release()
    return found


def as_recipe(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """A recipe object from an object, a dict or a YAML path, with ``overrides`` (``key=value``) applied."""
    if isinstance(overrides, str):
        raise RecipeError(f"overrides are a list of 'key=value' strings, for example ['{overrides}']")
    if isinstance(recipe, Recipe):
        if overrides:
            return parse_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides))
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(apply_overrides(dict(recipe), overrides or []))
    if not isinstance(recipe, str | Path):
        raise RecipeError(f"a recipe is a Recipe, a dict or the path of a YAML file, not {type(recipe).__name__}")
    return load_recipe(recipe, overrides)


def run(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunResult:
    """Run a recipe (object, dict or YAML path) to the end and return where the report is.

    Running it again on the same folder resumes an interrupted run or reuses finished phases.
    Started in several processes (``torchrun``, ``distill run --nproc``), they share the
    teacher cache and the training; the main process alone then evaluates and writes the
    report, and the others return when training is done, with no measured ``models``.
    """
    recipe = as_recipe(recipe, overrides)
    procs = process_state(recipe.train)
    per_process_batch(recipe.train.batch_size, procs.num_processes)
    with locked(recipe.run_dir(), procs.is_main_process):
        return _run_stages(recipe, procs) if recipe.stages else _run(recipe, procs)


def _run(recipe: Recipe, procs: PartialState) -> RunResult:
    check_tasks(recipe.evaluate.suite)  # named now, not after training
    folder = _prepare_folder(recipe, procs)
    task = build_task(recipe.task, recipe.data)
    teacher = load_teacher(recipe)
    if isinstance(task, EmbeddingTask):
        task.use_teacher(teacher)  # the reference of its label-free validation metric
    certainty = None  # a mix the teacher has little to say about is named before training
    if recipe.losses and procs.is_main_process and not (folder / "student" / "distill.json").is_file():
        certainty = teacher_certainty(task, teacher)
    # Built once, on the CPU with the teacher; every role below trains a fresh copy of it.
    built = BuiltStudent.build(recipe, teacher, task)
    pair = _pairing(recipe, built, teacher, task, True, procs)  # fail fast, before the teacher cache
    sharded = sharded_teacher(recipe.train, procs.num_processes)
    if recipe.train.shard_teacher and not sharded:
        log.info("train.shard_teacher: one process, so the teacher stays whole")
    try:
        trained = (folder / "student" / "distill.json").is_file()
        if not sharded:  # a teacher too large for one device runs online, sharded
            teacher.module.to(procs.device)
        cache = None if trained else cache_for(recipe, pair, task)
    finally:
        teacher.module.to("cpu")
        pair.release()
    del pair  # the check's copy of the student: each role trains its own
    _train_one(recipe, "student", built, teacher, task, cache, folder, procs)
    if recipe.baseline and not (folder / "baseline" / "distill.json").is_file():
        start = built if recipe.baseline_from is None else BuiltStudent.build(recipe.baseline_start(), teacher, task)
        if isinstance(task, EmbeddingTask):  # no labels: "without the teacher" is the untrained student
            _save_untrained(recipe, start, folder, procs)
        else:
            _train_one(recipe, "baseline", start, teacher, task, None, folder, procs)
    if not procs.is_main_process:
        return RunResult(folder, folder / "report.md", {})
    # A sharded teacher is whole nowhere: the main process loads it again, on the CPU, to measure it.
    models = evaluate_run(folder, recipe, task, None if sharded else teacher, certainty=certainty)
    report = report_run(folder)
    return RunResult(folder, report, models)


def _run_stages(recipe: Recipe, procs: PartialState) -> RunResult:
    """Run each stage in turn (a finished stage is reused), then write the staged report."""
    if missing := missing_paths(recipe):  # before stage 1 trains: a later stage's typo costs nothing
        raise DataError(not_found(recipe.name, missing))
    folder = _prepare_folder(recipe, procs)
    stages = recipe.stage_recipes()
    result = RunResult(folder, folder / "report.md", {})
    for i, stage in enumerate(stages, 1):
        log.info("stage %d of %d: %s (%s)", i, len(stages), recipe.stages[i - 1].name, stage.run_dir())
        with locked(stage.run_dir(), procs.is_main_process):
            result = _run(stage, procs)
    if not procs.is_main_process:
        return RunResult(folder, folder / "report.md", {})
    for role in ("student", "baseline"):  # the run's models where a run keeps them: the last stage's
        if (stages[-1].run_dir() / role / "distill.json").is_file():
            copy_model_atomic(stages[-1].run_dir() / role, folder / role)
    return RunResult(folder, report_stages(recipe), result.models)


def final_folder(folder: Path) -> Path:
    """The folder holding a run's final student: the run's own, or a staged run's last stage's."""
    if _staged(folder):
        return load_recipe(folder / "recipe.yaml").stage_recipes()[-1].run_dir()
    return folder


def _staged(folder: Path) -> bool:
    """Whether ``folder`` holds a staged run (its subfolders hold the stages' runs)."""
    try:
        return bool(yaml.safe_load((folder / "recipe.yaml").read_text()).get("stages"))
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def report_stages(recipe: Recipe) -> Path:
    """(Re)write the report of a staged run from its stages' reports."""
    stages = [(spec.name, stage.run_dir()) for spec, stage in zip(recipe.stages, recipe.stage_recipes(), strict=True)]
    missing = [str(path) for _, path in stages if not (path / "report.md").is_file()]
    if missing:
        raise RunFolderError(f"{recipe.run_dir()}: stages not finished yet: {', '.join(missing)}; run the recipe again")
    return write_stages_report(recipe.run_dir(), recipe.name, stages)


def _machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {threads} torch thread{'s' * (threads != 1)}, torch {torch.__version__}"


def _training_text(recipe: Recipe, trained: dict[str, Any]) -> str:
    """How the student was trained, for the report and model card: its losses and what was done
    to its weights after the last step (``trained``: the student's ``distill.json``)."""
    parts = [f"{s.weight:g} x {s.name}{s.params or ''}" for s in recipe.losses]
    if recipe.task_loss_weight:
        parts.append(f"{recipe.task_loss_weight:g} x task loss")
    losses = ", ".join(parts)
    if recipe.on_policy is not None:
        losses += f"; on-policy: {recipe.on_policy.fraction:g} of batches written by the student"
    if trained.get("stopped_at"):
        losses += (f"; stopped at step {trained['stopped_at']} of {trained['steps']}, its validation score no better "
                   f"in {recipe.train.patience} evaluations (train.patience)")
    kept = [r["kept_best"] for r in trained.get("eval", []) if "kept_best" in r]
    if kept:
        losses += f"; the student of step {kept[-1]} kept, its best validation score (train.keep_best)"
    if recipe.train.merge_start:
        losses += f"; then {recipe.train.merge_start:g} of the student's start mixed back in (train.merge_start)"
    return losses


def evaluate_run(folder: Path, recipe: Recipe | None = None, task: Any = None, teacher: Adapter | None = None,
                 suite: list[str] | None = None, certainty: dict[str, float] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Measure teacher, student and baseline of a finished run and write ``eval.json``.

    ``suite`` names evaluation-suite tasks to score them on, built-in ones or the recipe's own
    (default: the recipe's ``evaluate.suite``). ``certainty``: :func:`teacher_certainty` as the
    run measured it before training, so the teacher does not answer the same texts twice.
    """
    recipe = recipe or load_recipe(folder / "recipe.yaml")
    tasks = select_tasks(suite, recipe.evaluate.suite) if suite is not None else recipe.evaluate.suite
    check_tasks(tasks)  # a typo or a missing file is named before minutes of work
    if suite and recipe.task not in ("sts", "embedding"):
        raise RecipeError(f"--suite scores sentence embeddings; {folder} is a '{recipe.task}' run, which has none")
    if recipe.stages:  # a staged run: each stage is measured in its own folder
        models: dict[str, dict[str, Any]] = {}
        for stage in recipe.stage_recipes():
            models = evaluate_run(stage.run_dir(), stage, suite=suite)
        return models
    task = task or build_task(recipe.task, recipe.data)
    teacher = teacher or load_teacher(recipe)
    teacher.module.to("cpu")
    if isinstance(task, EmbeddingTask):
        task.use_teacher(teacher)
    # Trained on labels alone (no losses), the run has no teacher to measure against.
    adapters: dict[str, Adapter] = {"teacher": teacher} if recipe.losses else {}
    models: dict[str, dict[str, Any]] = {"teacher": measure(teacher, task)} if recipe.losses else {}
    for role in ("student", "baseline"):
        saved = folder / role
        if (saved / "distill.json").is_file():
            adapters[role] = load_model(recipe.student, recipe.student_kind, str(saved))
            models[role] = measure(adapters[role], task, saved)
    if "student" not in models:
        raise RunFolderError(f"{folder}: no trained student yet; run the recipe first")
    for role, timing in time_models(adapters, task, recipe.evaluate).items():
        models[role].update(timing)
    trained = read_json(folder / "student" / "distill.json", "run the recipe again to retrain it")
    student = recipe.student.derive.model_dump(exclude_none=True) if recipe.student.derive else (
        recipe.student.arch or recipe.student.source)
    steps, losses = trained.get("steps"), _training_text(recipe, trained)
    summary = {
        "recipe": recipe.name, "metric": task.metric, "higher_is_better": higher_is_better(task),
        "teacher": teacher_name(recipe.teacher) if recipe.losses else None,
        "student": f"`{student}`", "data": str(recipe.data.path), "losses": losses,
        "mix": [{"path": str(m.path), "weight": m.weight} for m in recipe.data.mix],
        "task_loss_weight": recipe.task_loss_weight, "steps": steps,
        "machine": _machine(), "models": models,
    }
    if recipe.losses and (certainty := certainty or teacher_certainty(task, teacher)) is not None:
        summary["mix_certainty"] = certainty
    if tasks:
        summary["suite"] = suite_scores(adapters, recipe.evaluate, tasks, recipe.cache.dir / "suite-scores.json")
    if isinstance(task, EmbeddingTask) and "baseline" in models:
        summary["baseline_untrained"] = True
    (folder / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return models


def teacher_certainty(task: Any, teacher: Adapter) -> dict[str, float] | None:
    """The teacher's mean top-class probability on the test texts and on data.mix's, for a
    classifier with a mix (else ``None``); a warning when it is far less sure of the mix."""
    certainty = getattr(task, "mix_certainty", None)
    found = certainty(teacher) if certainty is not None else None
    if found is not None and found["mix"] < found["test"] - 0.1:
        log.warning("the teacher is far less sure of data.mix's texts than of the test texts (mean top-class "
                    "probability %.3f against %.3f): they may not be texts its task has answers for, and may "
                    "teach the student little (docs/results.md, 'which texts to mix')", found["mix"], found["test"])
    return found


def report_run(folder: Path) -> Path:
    """(Re)write the report of a run from its ``eval.json``, metrics and exports, and the
    student's model card (``student/README.md``)."""
    eval_file = folder / "eval.json"
    if not eval_file.is_file() and _staged(folder):
        recipe = load_recipe(folder / "recipe.yaml")
        for stage in recipe.stage_recipes():
            report_run(stage.run_dir())
        return report_stages(recipe)
    if not eval_file.is_file():
        raise RunFolderError(f"{folder}: no eval.json; run 'distill eval {folder}' first")
    summary = read_evaluation(eval_file)
    deployment = read_exports(folder).get("deployment")
    if deployment is not None:
        summary["deployment"] = deployment
    histories = {}
    for role in ("student", "baseline"):
        path = folder / "train" / role / "metrics.jsonl"
        if path.is_file():
            histories[role] = read_json_lines(path)
    report = write_report(folder, summary, histories)
    write_model_card(folder, summary)
    return report
