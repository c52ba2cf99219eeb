"""Measure the exported student as it would be deployed: size, CPU latency, throughput, quality.

Teacher, student and int8 student, in PyTorch and in onnxruntime, are timed in turn on real
test inputs; :func:`distill.exporting.export_run` records the figures in ``export/export.json``,
and the report and the model card show them.
"""

from __future__ import annotations

import copy
import io
import logging
import platform
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.config import Recipe
from distill.errors import ModelError
from distill.evaluate import folder_size, time_models
from distill.export import TOLERANCE, ExportedAdapter, export_onnx, graph_of, load_onnx, require_onnx, sample_inputs
from distill.models.hf import unwrap
from distill.models.load import load_teacher
from distill.records import read_evaluation
from distill.tasks.base import higher_is_better

__all__ = ["measure_deployment", "perplexity", "quantize_torch"]

log = logging.getLogger(__name__)

#: ``(model, runtime, weights)``, e.g. ``("student", "onnxruntime", "int8")``.
Key = tuple[str, str, str]


def quantize_torch(adapter: Any) -> Any | None:
    """A copy of the model whose linear layers compute in int8 (PyTorch dynamic quantization), or
    ``None`` when it has none. A language model's output head stays in float: the adapter hands it
    over as a weight matrix."""
    module = unwrap(adapter.module)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    linear = {name for name, m in module.named_modules() if isinstance(m, nn.Linear) and m is not head}
    if not linear:
        return None
    quantized = copy.copy(adapter)
    with warnings.catch_warnings():
        # torch 2.13 announces that its quantized tensor types will go in a later release; they
        # still work, and this row is how a reader compares onnxruntime's int8 with PyTorch's.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        quantized.module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module).eval(), linear,
                                                                  dtype=torch.qint8)
    return quantized


def _state_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return len(buffer.getvalue())


def _saved_bytes(adapter: Any) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(Path(tmp))
        return folder_size(Path(tmp))


@torch.inference_mode()
def perplexity(model: ExportedAdapter, task: Any) -> float:
    """Held-out perplexity from an exported language model's logits (the task's own evaluation
    reads hidden states and the head, which an exported model does not give)."""
    data = task.splits["test"]
    nll, tokens = 0.0, 0
    for start in range(0, len(data), 16):
        inputs = data.batch(range(start, min(start + 16, len(data))))["inputs"]
        enc = model.encode(inputs)
        logits = model(inputs)["logits"][:, :-1].float()
        mask = enc.get("loss_mask", enc["attention_mask"])[:, 1:].cpu().float()
        losses = F.cross_entropy(logits.transpose(1, 2), enc["input_ids"][:, 1:].cpu(), reduction="none")
        nll += float((losses * mask).sum())
        tokens += int(mask.sum())
    return float(torch.exp(torch.tensor(nll / max(tokens, 1))))


def _quality(model: Any, task: Any) -> float:
    if isinstance(model, ExportedAdapter) and task.metric == "perplexity":
        return perplexity(model, task)
    return float(task.evaluate(model, "test"))


def _machine() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _entries(folder: Path, teacher: Any, student: Any, onnx_file: Path, int8_file: Path | None,
             evaluated: dict[str, Any]) -> dict[Key, tuple[Any, int]]:
    """The models to measure, with their sizes in bytes: all but the teacher in onnxruntime."""
    entries: dict[Key, tuple[Any, int]] = {
        ("teacher", "pytorch", "float32"): (teacher, evaluated.get("teacher", {}).get("size_bytes")
                                            or _saved_bytes(teacher)),
        ("student", "pytorch", "float32"): (student, folder_size(folder / "student")),
        ("student", "onnxruntime", "float32"): (load_onnx(onnx_file, graph_of(student)), onnx_file.stat().st_size),
    }
    if int8_file is not None:
        quantized = quantize_torch(student)
        if quantized is not None:
            entries["student", "pytorch", "int8"] = (quantized, _state_bytes(quantized.module))
        entries["student", "onnxruntime", "int8"] = (load_onnx(int8_file, graph_of(student)),
                                                    int8_file.stat().st_size)
    return entries


def _add_teacher_onnx(entries: dict[Key, tuple[Any, int]], teacher: Any, kind: str, task: Any, path: Path,
                      tolerance: float) -> None:
    """The teacher in onnxruntime too, exported to ``path``; left out (with a warning) when it does not export."""
    try:
        export_onnx(teacher, path, sample_inputs(task, kind), tolerance)
        entries["teacher", "onnxruntime", "float32"] = (load_onnx(path, graph_of(teacher)), path.stat().st_size)
    except ModelError as exc:
        log.warning("the teacher is left out of the onnxruntime rows: %s", exc)


def _timed(models: dict[str, Any], task: Any, recipe: Recipe, rounds: int) -> list[dict[str, dict[str, float]]]:
    timings = []
    for i in range(rounds):
        log.info("timing %d models in turn (round %d of %d)", len(models), i + 1, rounds)
        timings.append(time_models(models, task, recipe.evaluate))
    return timings


def measure_deployment(folder: Path, recipe: Recipe, task: Any, student: Any, onnx_file: Path,
                       int8_file: Path | None, tolerance: float = TOLERANCE, rounds: int = 1) -> dict[str, Any]:
    """Teacher, student and int8 student in PyTorch and onnxruntime: size, CPU latency, quality.

    The models are timed in turn, pass by pass, on real test inputs (tokenisation included), as
    the run's evaluation times them; with ``rounds`` above 1 that is repeated and the medians of
    the rounds are kept (``latency_ms_rounds`` lists each). The float PyTorch qualities are the
    evaluation's own (``eval.json``), measured the same way; every other quality is measured here
    on the test split.
    """
    evaluated = {}
    if (folder / "eval.json").is_file():
        evaluated = read_evaluation(folder / "eval.json")["models"]
    teacher = load_teacher(recipe)
    teacher.module.to("cpu")
    metric = task.metric
    entries = _entries(folder, teacher, student, onnx_file, int8_file, evaluated)
    with tempfile.TemporaryDirectory() as tmp:
        _add_teacher_onnx(entries, teacher, recipe.teacher.kind or "torch", task, Path(tmp) / "teacher.onnx",
                          tolerance)
        order = sorted(entries, key=lambda k: (k[0] != "teacher", k[2] != "float32", k[1] != "pytorch"))
        rows = []
        for key in order:
            model, size = entries[key]
            known = evaluated.get(key[0], {}).get(metric) if key[1:] == ("pytorch", "float32") else None
            log.info("measuring %s quality", " ".join(key))
            quality = known if known is not None else _quality(model, task)
            rows.append({"model": key[0], "runtime": key[1], "weights": key[2], "size_bytes": size, metric: quality})
        timings = _timed({" ".join(k): entries[k][0] for k in order}, task, recipe, rounds)
    for row, key in zip(rows, order, strict=True):
        runs = [t[" ".join(key)] for t in timings]
        row.update(runs[0])
        for figure in ("latency_ms", "latency_ms_iqr", "throughput"):
            row[figure] = statistics.median(r[figure] for r in runs)
        row["latency_ms_rounds"] = [r["latency_ms"] for r in runs]
    return {"metric": metric, "higher_is_better": higher_is_better(task), "machine": _machine(),
            "onnxruntime": require_onnx().__version__, "rows": rows}
