"""Measure a model: quality, parameters, size on disk, CPU latency and throughput."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill.cache import model_fingerprint
from distill.config import EvalSpec
from distill.models.adapters import Adapter
from distill.models.derive import count_parameters
from distill.suite import run_suite
from distill.suite_tasks import Task, task_key, task_name
from distill.tasks.embedding import encode_texts
from distill.tmpfiles import remove_abandoned, temporary_name

__all__ = ["folder_size", "measure", "suite_scores", "time_models"]


def folder_size(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model folder."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def _split(inputs: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i : i + 1] for k, v in inputs.items()}


@torch.inference_mode()
def time_models(models: dict[str, Adapter], task: Any, spec: EvalSpec) -> dict[str, dict[str, float]]:
    """CPU latency at batch 1 and throughput at ``spec.batch_size``, models timed in turn.

    The models take turns pass by pass, so a change in machine load during the measurement
    hits all of them alike and the ratios between them stay fair. Inputs are real test
    examples (tokenisation included: it is part of serving a text model). Medians after warm-up.
    Throughput counts examples per second, or the task's own unit (tokens for a language model)
    when the task has a ``count_units(model, inputs)`` method.
    """
    sample = task.sample_inputs(max(spec.batch_size, 16))
    singles = [_split(sample, i) for i in range(16)]
    batch = {k: v[: spec.batch_size] for k, v in sample.items()}
    n = len(next(iter(batch.values())))
    for model in models.values():
        model.module.eval()
        for i in range(spec.warmup):
            model(singles[i % 16])
            model(batch)
    single_times: dict[str, list[float]] = {role: [] for role in models}
    batch_times: dict[str, list[float]] = {role: [] for role in models}
    for i in range(spec.latency_repeats):
        for role, model in models.items():
            start = time.perf_counter()
            model(singles[i % 16])
            single_times[role].append(time.perf_counter() - start)
    for _ in range(spec.throughput_repeats):
        for role, model in models.items():
            start = time.perf_counter()
            model(batch)
            batch_times[role].append(time.perf_counter() - start)
    count = getattr(task, "count_units", None)
    return {
        role: {
            "latency_ms": 1000 * statistics.median(single_times[role]),
            "latency_ms_iqr": 1000 * _iqr(single_times[role]),
            "throughput": (count(model, batch) if count else n) / statistics.median(batch_times[role]),
            "throughput_unit": getattr(task, "throughput_unit", "examples"),
            "threads": torch.get_num_threads(),
        }
        for role, model in models.items()
    }


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def measure(model: Adapter, task: Any, saved: Path | None = None) -> dict[str, Any]:
    """Quality on the test split, parameters and size on disk of one model.

    Args:
        model: The adapter to measure.
        task: Supplies the test split.
        saved: The model's saved folder; when ``None`` the model is saved to a temporary folder
            the same way, so sizes are comparable.
    """
    model.module.eval()
    quality = task.evaluate(model, "test")
    if saved is None:
        with tempfile.TemporaryDirectory() as tmp:
            model.save(Path(tmp))
            size = folder_size(Path(tmp))
    else:
        size = folder_size(saved)
    return {task.metric: quality, "parameters": count_parameters(model.module), "size_bytes": size}


def suite_scores(models: dict[str, Adapter], spec: EvalSpec, tasks: list[Task] | None = None,
                 store: Path | None = None) -> dict[str, dict[str, float]]:
    """Every model's scores on the evaluation suite's ``tasks`` (default: ``spec.suite``), by role.

    The models must produce sentence embeddings; the suite's data is read from ``spec.suite_data``.
    With ``store`` (a JSON file), scores are kept by the model's weights and the task's settings,
    so a model already scored (the teacher, in every run of a study) is not scored again.
    """
    tasks = list(tasks if tasks is not None else spec.suite)
    known = json.loads(store.read_text()) if store is not None and store.is_file() else {}
    scores: dict[str, dict[str, float]] = {}
    for role, model in models.items():
        model.module.to("cpu")
        weights = model_fingerprint(model.module, {"data": str(spec.suite_data), "probe_limit": spec.probe_limit})
        keys = {task_name(t): f"{weights}:{task_key(t)}" for t in tasks}
        todo = [t for t in tasks if keys[task_name(t)] not in known]

        def encode(texts: list[str], model: Adapter = model) -> Any:
            return encode_texts(model, texts, spec.batch_size)

        fresh = run_suite(encode, todo, spec.suite_data, probe_limit=spec.probe_limit,
                          label=role) if todo else {}
        known.update({keys[name]: v for name, v in fresh.items()})
        scores[role] = {name: known[key] for name, key in keys.items()}
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(store.parent, store.name)
        part = temporary_name(store)
        part.write_text(json.dumps(known, indent=1) + "\n")
        os.replace(part, store)
    return scores
